"""Strict JAX for every test: rank promotion raises, and 8 fake CPU devices exist for data-parallel tests.

Two tiers: ``pytest -q`` runs the fast tier; ``pytest -q -m "slow or multiprocess"`` the rest
(``.ci/run`` runs both; ``pytest -m ""`` runs everything at once).  ``multiprocess``: tests whose
code starts processes (``subprocess``, ``Popen``, ``multiprocessing``), found from their source.
``slow``: the tests listed in :data:`SLOW`, each measured at 5 s or more (call or set-up, under
load) by ``pytest --durations=0`` on a 2-core AMD EPYC (2026-12-07): end-to-end training, large
compilations, derivative checks of whole models.  Re-measure and edit the list when tests change.

One persistent compilation cache serves the whole run: the pytest-xdist workers and the training
subprocesses that tests start inherit its folder from this process's environment, so a program
compiled once (e.g. a killed run and its resumption) is not compiled again.
"""

import inspect
import os
import re
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="lateral_jax_tests_jit_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


SLOW = frozenset(
    {
        "tests/reliability_test.py::test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint",
        "tests/hgru_test.py::test_under_shard_map_equals_one_device",
        "tests/hgru_test.py::test_contractor_penalty_is_sown_in_implicit_mode_and_enters_the_loss",
        "tests/hgru_test.py::test_gradients_equal_finite_differences_in_reverse_and_forward_mode",
        "tests/hgru_test.py::test_implicit_gradient_equals_finite_differences_and_a_long_unroll",
        "tests/hgru_test.py::test_contractor_penalty_is_the_hinged_column_sums_of_the_jacobian",
        "tests/hgru_test.py::test_jit_and_vmap_equal_the_plain_call",
        "tests/hgru_test.py::test_remat_equals_full_and_truncated_equals_a_manual_stop_gradient",
        "tests/hgru_test.py::test_the_probe_measures_cnn_layers_and_leaves_the_hgru_model_out",
        "tests/hgru_test.py::test_nnx_model_equals_linen_in_logits_and_gradients",
        "tests/hgru_test.py::test_lccnn_sows_the_contractor_penalty_only_when_asked",
        "tests/hgru_test.py::test_layer_spectral_radii_include_the_hgru_and_match_nnx",
        "tests/pathfinder_published_test.py::test_markers_are_connected_exactly_in_positive_images",
        "tests/parallel_test.py::test_data_parallel_helper_fixes_the_naive_steps_device_count_error",
        "tests/analysis_test.py::test_stimuli_shapes_and_model_input_mapping",
        "tests/bench_test.py::test_bench_rows_and_conv_algorithms_agree",
        "tests/bench_test.py::test_bench_splits_the_batch_over_devices",
        "tests/config_test.py::test_a_batch_larger_than_the_training_split_is_refused_by_both_feeds",
        "tests/config_test.py::test_a_core_install_trains",
        "tests/config_test.py::test_every_model_takes_the_whole_loop_options_value",
        "tests/curves_test.py::test_curves_train_each_level_resume_and_tabulate",
        "tests/curves_test.py::test_the_pathfinder_benchmark_runs_published_lengths_with_the_hgru_settings",
        "tests/docs_test.py::test_python_block_runs_as_written",
        "tests/docs_test.py::test_tutorial_runs_in_short_mode",
        "tests/dynamics_test.py::test_layer_spectral_radii_of_models_equal_the_per_layer_estimate",
        "tests/dynamics_test.py::test_matrix_free_tools_equal_the_dense_jacobian",
        "tests/ei_test.py::test_parametrisation_keeps_every_sign_through_100_optimiser_steps",
        "tests/ei_test.py::test_projection_leaves_no_wrong_sign_weight",
        "tests/forward_mode_test.py::test_hessian_vector_products_agree_in_both_orders",
        "tests/forward_mode_test.py::test_implicit_mode_derivatives_equal_a_long_unroll_in_every_order",
        "tests/forward_mode_test.py::test_jacfwd_equals_jacrev_through_a_lateral_layer",
        "tests/forward_mode_test.py::test_max_pool_forward_mode_equals_flax_and_reverse_mode",
        "tests/forward_mode_test.py::test_models_jvp_equals_vjp_and_finite_differences",
        "tests/forward_mode_test.py::test_winograd_derivatives_equal_the_xla_reference_in_every_order",
        "tests/fused_test.py::test_fused_bfloat16_tracks_the_float32_reference",
        "tests/fused_test.py::test_fused_check_passes_on_a_model_without_norms",
        "tests/fused_test.py::test_fused_kernel_in_forward_mode_and_linearize_equals_the_xla_loop_and_grad_keeps_its_kernel",
        "tests/fused_test.py::test_fused_kernel_trains_data_parallel_on_8_devices_like_xla_on_1",
        "tests/fused_test.py::test_fused_loops_match_the_xla_loop_values_and_gradients",
        "tests/models_test.py::test_group_norm_equals_the_one_step_reference_up_to_summation_order",
        "tests/models_test.py::test_lateral_resnet_records_lateral_stages",
        "tests/models_test.py::test_model_returns_per_loop_states_of_the_chosen_layers",
        "tests/models_test.py::test_models_jit_and_grad",
        "tests/models_test.py::test_unshared_control_has_one_kernel_per_loop_and_equal_compute",
        "tests/multihost_test.py::test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one",
        "tests/multihost_test.py::test_two_processes_equal_one_process_on_the_global_batch",
        "tests/nnx_test.py::test_nnx_optimizer_trains_and_wrong_input_is_refused",
        "tests/nnx_test.py::test_same_params_give_the_same_outputs_and_gradients",
        "tests/official_test.py::test_preparing_and_reading_never_imports_tensorflow",
        "tests/parallel_test.py::test_every_grad_mode_under_shard_map_equals_one_device",
        "tests/parallel_test.py::test_pmap_step_equals_the_jit_step",
        "tests/parallel_test.py::test_implicit_and_truncated_modes_under_pmap_equal_one_device",
        "tests/plan_test.py::test_gpu_and_tpu_plans_scan_where_the_cpu_plan_unrolls_and_all_agree",
        "tests/plan_test.py::test_long_cpu_loops_and_the_hgru_follow_their_plans",
        "tests/parallel_test.py::test_shard_map_step_equals_the_jit_step",
        "tests/predict_test.py::test_predictions_on_the_validation_images_give_the_runs_validation_accuracy",
        "tests/predict_test.py::test_the_cli_refuses_bad_input_with_one_line_and_exit_2",
        "tests/predict_test.py::test_the_cli_writes_id_label_class_and_probabilities_for_an_older_step",
        "tests/recurrence_test.py::test_full_gradient_matches_finite_differences",
        "tests/recurrence_test.py::test_implicit_gradient_matches_long_unroll_at_a_fixed_point",
        "tests/recurrence_test.py::test_jit_vmap_grad_compose",
        "tests/recurrence_test.py::test_remat_batch_chunks_give_the_full_gradient_and_states",
        "tests/recurrence_test.py::test_remat_batch_chunks_on_a_batch_sharded_over_8_devices_equal_bptt",
        "tests/recurrence_test.py::test_remat_gradient_equals_full",
        "tests/recurrence_test.py::test_remat_memory_does_not_grow_with_t",
        "tests/reliability_test.py::test_a_diverging_run_stops_naming_the_step_or_warns_when_asked",
        "tests/reliability_test.py::test_a_run_does_not_resume_on_an_archive_replaced_in_place",
        "tests/reliability_test.py::test_after_a_corrupt_newest_checkpoint_the_retrained_steps_are_saved",
        "tests/reliability_test.py::test_bad_command_lines_exit_2_with_one_line_naming_the_fix",
        "tests/reliability_test.py::test_long_loops_roll_on_cpu_so_compile_time_stays_bounded",
        "tests/reliability_test.py::test_move_aside_starts_afresh_and_keeps_the_old_run_beside_it",
        "tests/reliability_test.py::test_processes_preparing_one_archive_at_once_take_turns_and_read_the_same_data",
        "tests/reliability_test.py::test_sigterm_saves_and_exits_with_the_preempted_status",
        "tests/reliability_test.py::test_sigterm_while_starting_up_exits_with_the_preempted_status",
        "tests/reliability_test.py::test_training_logs_the_largest_loop_residual",
        "tests/run_test.py::test_a_second_seed_reuses_the_compiled_programs_and_gets_what_a_fresh_process_gets",
        "tests/run_test.py::test_cifar10_smoke_on_the_shared_archive",
        "tests/run_test.py::test_kill_minus_nine_then_resume_equals_an_uninterrupted_run",
        "tests/run_test.py::test_main_job_smoke_config_end_to_end",
        "tests/run_test.py::test_natural_images_smoke_on_a_generated_archive",
        "tests/run_test.py::test_other_configs_smoke",
        "tests/run_test.py::test_same_seed_same_parameters",
        "tests/scale_test.py::test_device_resident_data_is_sharded_and_gathered_locally",
        "tests/scale_test.py::test_gradient_accumulation_equals_one_step_on_the_whole_batch",
        "tests/scale_test.py::test_imagenet_smoke_trains_a_lateral_resnet_on_the_ilsvrc_layout",
        "tests/scale_test.py::test_label_smoothing_and_lars",
        "tests/scale_test.py::test_lateral_resnet_gradient_equals_central_differences",
        "tests/scale_test.py::test_weight_ema_follows_its_recurrence_and_skips_non_finite_updates",
        "tests/study_test.py::test_a_killed_run_resumes_from_its_last_epoch_and_matches_an_uninterrupted_one",
        "tests/study_test.py::test_study_smoke_resumes_and_tabulates",
        "tests/train_test.py::test_data_parallel_step_equals_single_device_step",
        "tests/train_test.py::test_device_epoch_equals_the_host_loop_over_the_same_batches",
        "tests/train_test.py::test_eval_step_ignores_padding",
        "tests/train_test.py::test_projection_mode_keeps_lateral_kernels_sign_pure",
        "tests/train_test.py::test_train_step_lowers_the_loss_and_traces_once",
        "tests/winograd_test.py::test_lccnn_with_winograd_equals_the_xla_reference",
        "tests/winograd_test.py::test_max_pool_equals_flax_in_value_and_gradient",
        "tests/winograd_test.py::test_winograd_bfloat16_is_close_to_the_float32_reference",
        "tests/winograd_test.py::test_winograd_float64_is_exact_to_rounding",
        "tests/winograd_test.py::test_winograd_forward_mode_and_hessian_vector_products_equal_the_direct_convolution",
        "tests/winograd_test.py::test_winograd_matches_direct_convolution_values_and_gradients",
        "tests/winograd_test.py::test_winograd_tile_is_4_on_maps_of_32_and_more_or_256_channels",
        "tests/winograd_test.py::test_winograd_transforms_are_adjoint_pairs",
        "tests/winograd_test.py::test_winograd_vmaps_over_kernels_and_chunks_in_cache_sized_pieces",
    }
)
_STARTS_PROCESSES = re.compile(r"subprocess\.|Popen\(|multiprocessing")


def pytest_collection_modifyitems(config, items):
    """Marks the ``slow`` and ``multiprocess`` tiers (see the module docstring)."""
    for item in items:
        if item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)
        function = getattr(item, "function", None)
        if function is not None and _STARTS_PROCESSES.search(inspect.getsource(function)):
            item.add_marker(pytest.mark.multiprocess)


@pytest.fixture
def key():
    return jax.random.key(0)
