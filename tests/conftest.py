"""The `slow` mark, in one table: the fast loop is `pytest -m "not slow"` (under a minute on a quiet
2-core CPU), everything (CI) is plain `pytest`.

Slow: multi-process runs, FlexAttention, end-to-end runs (CLI runs of many steps, the demo,
compare, the experiments), the real model, and any test whose cases take more than about half a
second of CPU each or a couple of seconds together (their module fixtures included: a fixture
only slow tests use is then never built in the fast loop). Measured per test with CPU time, which
a busy machine does not inflate. tests/test_structure.py checks every name here is a test.
"""

import pytest

ALL = "*"  # every test of the module

SLOW = {
    # multi-process, FlexAttention, end to end, the real model: whole modules
    "test_distributed.py": ALL,
    "test_flex_attention.py": ALL,
    "test_demo.py": ALL,
    "test_crash_resume.py": ALL,  # subprocess runs killed and resumed
    "test_real_model.py": ALL,
    "test_compare.py": {"test_compare_smoke", "test_bad_reward_function_is_one_clear_line_and_exit_2",
                        "test_generate_command_writes_completions", "test_grpo_and_iterate_commands_run"},
    "test_experiments.py": {"test_experiment_quick", "test_both_drop_quick", "test_lora_memory_only_adapters_change"},
    "test_monitor.py": {"test_the_both_drop_experiment_fires", "test_both_drop_stop_saves_the_model_and_exits_3",
                        "test_weights_that_do_not_move_never_fire"},
    "test_trl_agreement.py": {"test_three_dpo_steps_agree_with_trl"},
    # over the limit as measured
}


def is_slow(module, name):
    names = SLOW.get(module, ())
    return names == ALL or name in names


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item.path.name, item.originalname):
            item.add_marker(pytest.mark.slow)
