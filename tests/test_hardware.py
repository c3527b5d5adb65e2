"""CPU honesty: which machines compute bf16 natively, what `--precision auto` picks, the warning for
an emulated bf16, and that a run records and fingerprints the precision it really ran in."""


import pytest
import yaml

from prefalign import checkpoint, fingerprint, hardware, train
from prefalign.cli import main
from prefalign.errors import UserError
from prefalign.hardware import EMULATED, NATIVE_AMX, NATIVE_ARM, NATIVE_AVX512, NATIVE_GPU, Machine
from prefalign.online.settings import GRPOConfig, IterativeConfig
from test_train import cfg_for, run_files  # noqa: F401 (the fixture)

AVX2_EPYC = Machine("AVX2", frozenset({"sse4_2", "avx", "avx2", "fma"}))  # Zen 2/3: no bf16 in hardware
AVX512_ONLY = Machine("AVX512", frozenset({"avx2", "avx512f", "avx512bw"}))  # Skylake-SP: still emulated
ZEN4 = Machine("AVX512", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE = Machine("AVX512", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
# ATEN_CPU_CAPABILITY=avx2 holds ATen's kernels back, but oneDNN's matmuls still use the CPU's bf16.
ZEN4_ATEN_AVX2 = Machine("AVX2", ZEN4.flags)
GRAVITON3 = Machine("DEFAULT", frozenset({"fp", "asimd", "sve", "bf16"}))
A100 = Machine("AVX2", AVX2_EPYC.flags, cuda=True, cuda_bf16=True)
V100 = Machine("AVX512", SAPPHIRE.flags, cuda=True, cuda_bf16=False)  # the GPU does the math, not the CPU
NOTHING_KNOWN = Machine("", frozenset())

WARNING = ("warning: bf16 on this CPU is emulated: expect it to be much slower than fp32; "
           "use --precision auto or fp32")


@pytest.mark.parametrize("machine, verdict, auto", [
    (AVX2_EPYC, EMULATED, "fp32"),
    (AVX512_ONLY, EMULATED, "fp32"),
    (NOTHING_KNOWN, EMULATED, "fp32"),
    (ZEN4, NATIVE_AVX512, "bf16"),
    (ZEN4_ATEN_AVX2, NATIVE_AVX512, "bf16"),
    (SAPPHIRE, NATIVE_AMX, "bf16"),
    (GRAVITON3, NATIVE_ARM, "bf16"),
    (A100, NATIVE_GPU, "bf16"),
    (V100, EMULATED, "fp32"),
])
def test_verdict_and_auto(machine, verdict, auto):
    assert hardware.verdict(machine) == verdict
    assert hardware.resolve("auto", machine) == auto
    # An explicit choice is the user's, on any machine.
    assert hardware.resolve("fp32", machine) == "fp32" and hardware.resolve("bf16", machine) == "bf16"


def test_messages():
    assert hardware.messages("bf16", AVX2_EPYC) == [WARNING]
    assert hardware.messages("bf16", V100) == [WARNING.replace("this CPU", "this GPU")]
    assert hardware.messages("bf16", SAPPHIRE) == [] and hardware.messages("fp32", AVX2_EPYC) == []
    assert hardware.messages("auto", AVX2_EPYC) == ["precision auto -> fp32: bf16 emulated (slow) on this CPU, ATen AVX2"]
    assert hardware.messages("auto", SAPPHIRE) == ["precision auto -> bf16: bf16 native (AMX) on this CPU, ATen AVX512"]
    assert hardware.messages("auto", A100) == ["precision auto -> bf16: bf16 native (GPU) on this GPU"]


def test_cpu_flags_from_proc_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n")
    assert hardware._proc_flags(str(x86)) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert hardware._proc_flags(str(arm)) == {"fp", "asimd", "sve", "bf16"}
    assert hardware._proc_flags(str(tmp_path / "missing")) == set()


def test_detect_agrees_with_torch():
    import torch

    m = hardware.detect()
    assert m.capability == torch.backends.cpu.get_cpu_capability()
    assert m.cuda == torch.cuda.is_available()
    assert ("avx512_bf16" in m.flags) >= torch.cpu._is_avx512_bf16_supported()  # every probe that says yes is in


def test_auto_on_this_machine_trains_records_and_fingerprints(run_files, tmp_path, capsys):  # noqa: F811
    want = hardware.resolve("auto", hardware.detect())
    out = tmp_path / "auto"
    rc = main(["train", "--model", run_files["model"], "--data", run_files["data"], "--output", str(out),
               "--max-steps", "2", "--batch-size", "4", "--max-length", "64", "--precision", "auto", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("precision auto -> ")]
    assert lines == [f"precision auto -> {want}: {hardware.describe(hardware.detect())}"]
    assert yaml.safe_load((out / "config.yaml").read_text())["precision"] == want
    state = checkpoint.read(checkpoint.find_resume(str(out / "checkpoints"), "auto"))[3]
    assert state["trainer"]["fingerprint"]["precision"] == want


def test_bf16_on_an_emulating_cpu_warns_and_auto_falls_back(run_files, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(hardware, "detect", lambda: AVX2_EPYC)
    train.train(cfg_for(run_files, tmp_path / "bf16", max_steps=1, precision="bf16"))
    assert WARNING in capsys.readouterr().err.splitlines()
    result = train.train(cfg_for(run_files, tmp_path / "auto", max_steps=1, precision="auto"))
    err = capsys.readouterr().err
    assert "precision auto -> fp32: bf16 emulated (slow)" in err and "warning: bf16" not in err
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["precision"] == "fp32"
    assert result.steps == 1


@pytest.mark.parametrize("machine, want", [(SAPPHIRE, "bf16"), (AVX2_EPYC, "fp32")])
def test_fingerprint_sees_the_resolved_precision(run_files, tmp_path, monkeypatch, machine, want):  # noqa: F811
    monkeypatch.setattr(hardware, "detect", lambda: machine)
    auto = fingerprint.of_run(cfg_for(run_files, tmp_path / "o", precision="auto"))
    concrete = fingerprint.of_run(cfg_for(run_files, tmp_path / "o", precision=want))
    assert auto["precision"] == want and fingerprint.differences(concrete, auto) == {}


def test_online_commands_take_auto(tmp_path):
    assert GRPOConfig(output=str(tmp_path), precision="auto").precision == "auto"
    with pytest.raises(UserError, match="precision must be one of fp32, bf16, auto; got 'fp16'"):
        GRPOConfig(output=str(tmp_path), precision="fp16")
    it = IterativeConfig(output=str(tmp_path), precision="auto")
    assert it.train_config(str(tmp_path / "r"), "pairs.jsonl", 1).precision == "auto"


@pytest.mark.parametrize("machine, want", [(SAPPHIRE, "bf16"), (AVX2_EPYC, "fp32")])
def test_grpo_resolves_auto_once_and_records_it(tmp_path, monkeypatch, capsys, machine, want):
    from prefalign.demo.model import build_model
    from prefalign.demo.tokenizer import build_tokenizer
    from prefalign.online.grpo import grpo

    monkeypatch.setattr(hardware, "detect", lambda: machine)
    tok = build_tokenizer()
    cfg = GRPOConfig(output=str(tmp_path), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2,
                     progress=False, save_model=False, precision="auto")
    grpo(cfg, model=build_model(tok, seed=0, hidden_size=32, intermediate_size=64), tokenizer=tok, prompts=["1+1=", "2+2="], reward="regex=1")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["precision"] == want
    assert capsys.readouterr().err.count("precision auto -> ") == 1


def test_iterate_resolves_auto_once_for_every_round(tmp_path, monkeypatch, capsys):
    from prefalign.demo.model import build_model
    from prefalign.demo.tokenizer import build_tokenizer
    from prefalign.online.iterative import iterate

    monkeypatch.setattr(hardware, "detect", lambda: AVX2_EPYC)
    tok = build_tokenizer()
    cfg = IterativeConfig(output=str(tmp_path / "run"), rounds=2, prompts_per_round=12, samples=4, max_new_tokens=3,
                          lr=1e-3, dpo_steps=1, batch_size=2, progress=False, save_model=False, precision="auto")
    prompts = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(6) for b in range(6)]
    res = iterate(cfg, model=build_model(tok, seed=0, hidden_size=32, intermediate_size=64), tokenizer=tok,
                  prompts=prompts, reward=lambda p, c: [float(x[:1].isdigit()) for x in c])
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["precision"] == "fp32"
    trained = [k for k in (1, 2) if (tmp_path / "run" / f"round-{k}" / "config.yaml").is_file()]
    assert trained and len(res.history) == 2
    for k in trained:  # each round's DPO run got the concrete value, not auto
        assert yaml.safe_load((tmp_path / "run" / f"round-{k}" / "config.yaml").read_text())["precision"] == "fp32"
    assert capsys.readouterr().err.count("precision auto -> ") == 1
