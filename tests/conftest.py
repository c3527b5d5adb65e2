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
    # module: ALL or {test function, or "function[case id]" for one case of a parametrized test}
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
    "test_model_folders.py": ALL,  # its module fixture trains a full and a LoRA run
    # end-to-end runs of the commands added in the renovation (reward, ppo, online layout), measured on a
    # quiet machine (the fast loop was 66 s with them; each 0.5-1.2 s)
    "test_online_layout.py": ALL,
    "test_reward_model.py": {"test_resumed_runs_end_with_the_weights_of_an_uninterrupted_one",
                             "test_grpo_runs_on_a_reward_model", "test_reward_model_learns_demo_pairs_above_chance"},
    "test_speed_paths2.py": {"test_token_budget_minus_one_trains_as_the_default_layout"},
    # over the limit as measured
    "test_api.py": {"test_the_readme_example", "test_keyword_fields_dataset_sft_evaluate_generate"},
    "test_audit.py": {"test_reference_margins_equal_direct_logprobs"},
    "test_bad_inputs.py": {"test_no_traceback_in_a_real_process", "test_overwrite_replaces_the_old_runs_checkpoints",
                           "test_huge_rows_and_long_prompts_are_truncated_and_counted"},
    "test_cli_ux.py": {"test_a_trl_yaml_runs", "test_gradient_checkpointing_is_the_same_step",
                       "test_building_the_parsers_imports_no_heavy_module"},
    "test_feedback.py": {"test_summary_eval_lines_and_reference_progress", "test_mistyped_paths_fail_at_once_with_a_suggestion"},
    "test_fingerprint.py": {"test_resume_auto_with_only_output_equals_uninterrupted",
                            "test_changed_resume_is_refused_listing_the_difference", "test_swapped_in_place_data_is_refused",
                            "test_allowed_changes_are_applied_logged_and_recorded",
                            "test_checkpoint_without_fingerprint_resumes_with_a_warning",
                            "test_nonfinite_update_is_never_saved", "test_infinite_weight_decay_through_an_unvalidated_config"},
    "test_generate.py": {"test_greedy_kv_cache_equals_naive_recompute", "test_greedy_equals_transformers_generate",
                         "test_filters_that_leave_one_token_are_greedy", "test_sampled_logprobs_match_full_forward",
                         "test_stop_strings_cut_text_and_tokens", "test_seed_reproduces_and_differs",
                         "test_finished_rows_do_not_change_the_others", "test_stops_at_eos", "test_n_samples_per_prompt_shape"},
    "test_grpo.py": {"test_grpo_run_raises_a_trivially_learnable_reward", "test_existing_run_needs_overwrite"},
    "test_hardware.py": {"test_auto_on_this_machine_trains_records_and_fingerprints",
                         "test_bf16_on_an_emulating_cpu_warns_and_auto_falls_back",
                         "test_iterate_resolves_auto_once_for_every_round", "test_grpo_resolves_auto_once_and_records_it"},
    "test_hostile_data.py": {"test_smollm2_special_text_and_cut_equality", "test_memory_of_a_20mb_row_stays_near_its_size",
                             "test_skip_counts_and_rejects", "test_cut_then_tokenize_equals_tokenize_then_truncate",
                             "test_huge_row_is_cut_before_tokenizing", "test_skip_special_token_in_a_message"},
    "test_iterative.py": {"test_each_round_writes_its_pairs_and_metrics",
                          "test_reference_fixed_or_moved_to_the_last_rounds_policy"},
    "test_lean.py": {"test_lean_mlp_is_bitwise_the_same", "test_lora_policy_patched_trains_adapters_the_same",
                     "test_act_and_product_are_freed_until_the_backward"},
    "test_logprobs.py": {"test_no_full_logits_computed", "test_peft_lora"},
    "test_loss_contract.py": {"test_simpo_through_the_cli_gets_its_own_beta",
                              "test_orpo_nll_over_prompt_and_completion_is_trls_orpo",
                              "test_sft_train_loss_at_step_1_equals_eval_loss_before_the_update",
                              "test_combination_end_to_end_from_yaml", "test_loss_params_from_yaml_and_flags_merge"},
    "test_model_io.py": {"test_a_missing_tensor_is_refused_not_initialised", "test_tied_output_weights_are_not_missing",
                         "test_damaged_checkpoint_named_is_an_error_and_auto_falls_back",
                         "test_damaged_reference_cache_is_recomputed", "test_intact_cache_is_used_without_a_notice",
                         "test_disk_full_during_a_checkpoint_leaves_no_half_checkpoint",
                         "test_disk_full_on_a_write_that_names_no_file_names_the_output", "test_cache_dir_permission_denied"},
    "test_packing.py": {"test_packed_equals_padded_values_and_grads", "test_packed_token_logps_equal_padded_values_and_grads",
                        "test_peft_packed"},
    "test_reward_errors.py": {"test_in_range_rewards_still_train"},
    "test_rewards.py": {"test_judge_is_antisymmetric_and_ties_are_half", "test_reward_model_scores_match_single_rows"},
    "test_safety.py": {"test_trust_remote_code_is_off_unless_asked"},
    "test_rundir.py": {"test_a_bad_row_under_two_processes_is_one_line", "test_a_directory_of_another_tool_is_refused",
                       "test_a_failed_final_save_leaves_the_previous_model_whole",
                       "test_a_finished_run_continues_to_a_larger_max_steps_exactly",
                       "test_a_running_run_holds_its_directory_and_sighup_stops_it_with_a_checkpoint",
                       "test_overwrite_removes_the_replaced_runs_outputs", "test_rejects_are_written_once",
                       "test_resume_from_another_runs_checkpoint_never_replaces_a_run",
                       "test_resume_without_a_checkpoint_never_retrains_a_finished_run",
                       "test_sigterm_during_the_final_save_finishes_it_and_says_so", "test_weights_files_follow_the_umask"},
    "test_sft_kto_formats.py": {"test_eval_takes_kto_data", "test_sft_command_trains_on_messages"},
    "test_step_one.py": ALL,  # every loss x reference x precision through a real step
    "test_validation.py": {"test_other_commands[demo --output a file]", "test_other_commands[generate --output a directory]",
                           "test_train_yaml_refusals[deep nesting]"},
    "test_train.py": {"test_every_loss_trains", "test_accumulation_invariance", "test_kto_accumulation_invariance",
                      "test_resume_equals_uninterrupted", "test_lora_trains_only_adapters_and_adapters_off_is_the_base",
                      "test_precomputed_reference_equals_live", "test_packed_step_equals_padded_step",
                      "test_sft_loop_lowers_nll", "test_cli_trains_and_the_model_reloads",
                      "test_merged_lora_weights_reload_and_match_the_adapter",
                      "test_eval_command_reports_held_out_metrics", "test_bf16_autocast_tracks_fp32",
                      "test_tensorboard_logs_the_same_scalars"},
}


def is_slow(module, name, case=None):
    """`name`: the test function; `case`: its name with the parameters' id, as in "f[id]"
    (an entry may name one case of a parametrized test)."""
    names = SLOW.get(module, ())
    return names == ALL or name in names or case in names


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item.path.name, item.originalname, item.name):
            item.add_marker(pytest.mark.slow)
