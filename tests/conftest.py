from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .brokers import Mosquitto
from .mqttkit import AgentProcess, Observer
from .rabbit import Rabbit


# --- markers: `./build.sh test --quick` is `pytest -m "not slow"` ------------------------
# The one list of the long tests. `slow`: a test that took 1.5 s or more in timed runs
# (--junitxml, 2 cores at load 5 to 12), or 1.3 s in each of four, or a module that
# starts a RabbitMQ node (about 10 s to start and stop). The rest, about 80 % of the
# tests, take 2-3 minutes on this machine. Time a test (--durations=0) before adding it
# here or taking it out.
SLOW = ("slow",)
MODULE_MARKS: dict[str, tuple[str, ...]] = {
    "test_agent_flood": SLOW,
    "test_agent_hostile": SLOW,
    "test_agent_property": SLOW,
    "test_amqp_renew": SLOW,
    "test_amqps": SLOW,
    "test_api_openapi": SLOW,  # schemathesis --checks all: 1.5-3 min
    "test_bridge_fair": SLOW,
    "test_bridge_live": SLOW,
    "test_bridge_resync": SLOW,
    "test_chaos": SLOW,
    "test_cli_follow": SLOW,
    "test_cluster_election": (*SLOW, "cluster"),
    "test_cluster_nats": (*SLOW, "cluster"),
    "test_cluster_rabbit": (*SLOW, "cluster"),
    "test_console_browser": (*SLOW, "browser"),
    "test_console_views": (*SLOW, "browser"),
    "test_image_binary": (*SLOW, "image"),
    "test_image_boot": (*SLOW, "image"),
    "test_image_pxe": (*SLOW, "image"),
    "test_multi_instance": SLOW,
    "test_scheduler_amqp": SLOW,
    "test_scheduler_fanout": SLOW,
    "test_wheel": SLOW,
}
# single tests of quicker modules, "module::function" (every parametrisation)
TEST_MARKS: dict[str, tuple[str, ...]] = {name: SLOW for name in (
    "test_agent_contain::test_runner_timeout_ends_every_escapee",
    "test_agent_contain::test_sigterm_ends_every_escapee",
    "test_agent_contract::test_a_refused_cancel_is_marked_and_leaves_the_task_alone",
    "test_agent_contract::test_cancel_if_queued_withdraws_a_queued_task_and_never_kills_a_running_one",
    "test_agent_facts::test_a_hanging_executable_holds_up_no_task",
    "test_agent_facts::test_a_label_or_custom_fact_change_is_published_again",
    "test_agent_facts::test_changed_facts_are_published_again",
    "test_agent_facts::test_hostile_facts_never_stop_the_agent",
    "test_agent_labels::test_where_on_labels_against_a_live_scheduler",
    "test_agent_live::test_broker_killed_mid_task_final_update_still_arrives",
    "test_agent_live::test_updates_made_while_disconnected_are_delivered_after_reconnect",
    "test_agent_redeliver::test_clean_restart_sends_no_old_updates",
    "test_agent_redeliver::test_unacknowledged_final_update_is_sent_again_after_kill",
    "test_agent_tasks::test_failures_at_run_time_are_failed_with_codes",
    "test_agent_tls::test_agent_refuses_what_cannot_be_verified",
    "test_api_cli::test_logs_prints_a_finished_tasks_output_and_f_follows_a_running_one",
    "test_api_cli::test_nodes_lists_every_page",
    "test_api_cli::test_serve_refuses_plain_http_beyond_loopback_in_one_line",
    "test_api_cli::test_unknown_token_is_a_clear_error",
    "test_api_hostile::test_keep_alive_requests_and_a_websocket_outlive_the_head_deadline",
    "test_api_http::test_503_when_the_broker_is_gone",
    "test_api_http::test_first_start_token_file_is_private_and_the_local_cli_finds_it",
    "test_api_http::test_https_with_a_ca_file",
    "test_api_openapi::test_schemathesis_checks_all_pass",
    "test_api_probes::test_probes_need_no_token_carry_no_data_and_follow_the_broker",
    "test_cmdline::test_a_listing_into_head_is_quiet",
    "test_cmdline::test_help_into_a_closed_pipe_is_quiet",
    "test_download::test_deadline_covers_the_whole_transfer",
    "test_fleet_cli::test_a_detached_rollout_is_paused_shown_and_resumed",
    "test_fleet_cli::test_bad_where_is_exit_2_on_the_cli_and_422_on_the_api",
    "test_fleet_cli::test_retries_show_every_attempt",
    "test_fleet_cli::test_rollout_aborts_reports_why_and_is_shown",
    "test_fleet_cli::test_rollout_that_succeeds_exits_0",
    "test_fleet_cli::test_run_where_and_mac_targets",
    "test_fleet_graph::test_an_ordered_list_still_runs_step_by_step",
    "test_fleet_graph::test_every_node_then_the_controller_once_all_succeeded",
    "test_fleet_liveness::test_agent_killed_mid_task_alerts_then_lost_after_the_grace_then_late_truth_wins",
    "test_fleet_pacing::test_500_tasks_to_one_node_with_queue_64_all_succeed_none_busy",
    "test_fleet_pacing::test_a_task_held_past_its_expiry_ends_expired",
    "test_fleet_pg::test_pacing_retries_rollouts_and_graphs_on_postgresql",
    "test_fleet_restart::test_rollout_and_job_resume_after_a_restart",
    "test_fleet_retries::test_a_lost_attempt_is_canceled_before_the_next_one_runs",
    "test_fleet_retries::test_busy_rejections_are_retried_until_the_agent_has_room",
    "test_fleet_retries::test_failed_attempts_are_retried_in_turn_never_overlapping",
    "test_fleet_rollout::test_batch_5_aborts_after_3_failures_and_leaves_the_rest_untouched",
    "test_fleet_rollout::test_pause_holds_new_targets_and_resume_finishes",
    "test_fleet_rollout::test_the_window_never_holds_more_than_batch_targets",
    "test_job_views::test_a_cli_run_on_a_glob_is_one_job_with_one_progress_line",
    "test_logs_late::test_logs_f_attached_late_prints_the_earlier_output_then_follows",
    "test_messaging_acks::test_acks_out_of_order_twice_and_never_settle_exactly_what_was_recorded",
    "test_multi_view::test_a_bad_first_packet_is_closed_without_a_connack",
    "test_multi_view::test_amqp_scheduler_started_after_the_agents_knows_them",
    "test_multi_view::test_direct_mode_restarted_scheduler_learns_what_changed_while_it_was_away",
    "test_multi_view::test_nodes_forget_removes_a_node_and_says_so",
    "test_overview_api::test_the_same_aggregates_on_postgresql",
    "test_protocol::test_any_object_is_accepted_or_rejected_with_a_code",
    "test_rollout_withdraw::test_abort_sends_cancel_if_queued_and_a_started_target_finishes_and_counts",
    "test_scheduler_cli::test_bad_arguments_exit_2_with_one_line",
    "test_scheduler_cli::test_broker_down_is_reported_with_its_url",
    "test_scheduler_cli::test_config_layers_file_env_flag",
    "test_scheduler_cli::test_download_checks_the_checksum",
    "test_scheduler_cli::test_listings_show_and_cancel",
    "test_scheduler_cli::test_serve_exits_4_when_the_broker_is_unreachable",
    "test_scheduler_cli::test_unreachable_service_exits_4_and_names_the_url",
    "test_scheduler_demo::test_demo_runs_every_kind_of_task_and_exits_zero",
    "test_scheduler_embedded::test_direct_mode_end_to_end_with_the_embedded_broker",
    "test_scheduler_live::test_broker_restart_mid_task_the_final_update_still_arrives",
    "test_scheduler_live::test_node_killed_mid_task_ends_lost_never_running",
    "test_scheduler_live::test_registry_follows_retained_status_and_last_will",
    "test_scheduler_live::test_task_for_an_offline_node_expires_then_the_agent_confirms",
    "test_scheduler_live::test_updates_made_while_the_scheduler_was_down_are_recorded_after_restart",
    "test_scheduler_signing::test_a_signing_scheduler_drives_verifying_agents",
    "test_security_acl::test_anonymous_and_wrong_passwords_are_refused",
    "test_security_acl::test_nodes_are_confined_to_their_own_topics",
    "test_shell::test_live_output_arrives_while_running",
    "test_shell::test_term_ignoring_command_is_killed_after_grace",
    "test_store_commit::test_a_bootstrap_whose_file_cannot_be_written_stores_no_token",
    "test_store_commit::test_kill_9_between_commit_and_publication_loses_no_event",
    "test_store_commit::test_three_instances_bootstrapping_at_once_leave_one_valid_token",
    "test_store_commit::test_three_instances_ten_thousand_events_readers_resume_anywhere",
)}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import warnings

    modules: dict[str, object] = {}
    for item in items:
        module = item.nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
        modules.setdefault(module, getattr(item, "module", None))
        function = getattr(item, "originalname", item.name)
        for mark in (*MODULE_MARKS.get(module, ()), *TEST_MARKS.get(f"{module}::{function}", ())):
            item.add_marker(mark)
    for name in TEST_MARKS:  # a renamed test would silently join the quick ones
        module, _, function = name.partition("::")
        if module in modules and not hasattr(modules[module], function):
            warnings.warn(f"tests/conftest.py TEST_MARKS names {name}, which is gone: "
                          "mark the test under its new name", pytest.PytestWarning, stacklevel=1)


@pytest.fixture(autouse=True, scope="session")
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`edgerun serve` writes its first admin token under $XDG_STATE_HOME and the CLI reads
    it from there: keep the tests' tokens out of the user's home, in one place per run."""
    import os

    old = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if old is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = old


@pytest.fixture(autouse=True, scope="session")
def tidy_agent_cgroups(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """An agent killed with SIGKILL leaves its empty `edgerun-<key>` cgroup behind. At the
    end of the run remove those of this run's agents: the key ends in a hash of the state
    directory (edgerun.agent.contain.make_key), so a cgroup is ours when the hash is that
    of a directory under this run's temporary root. Only empty ones go (rmdir refuses a
    cgroup with processes or children in it)."""
    yield
    from edgerun.agent._lean import sha256_hex
    from edgerun.agent.contain import THREAD_ROOT, cgroup_base

    base = cgroup_base()
    if base is None:
        return
    import os

    # a threaded-mode agent keeps its cgroup in <its cgroup>/edgerun (contain.py)
    top = os.path.dirname(base) if os.path.basename(base) == THREAD_ROOT else base
    ours = set()
    for where in (top, os.path.join(top, THREAD_ROOT)):
        try:
            ours |= {os.path.join(where, name) for name in os.listdir(where)
                     if name.startswith("edgerun-")}
        except OSError:
            pass
    if not ours:
        return
    hashes: set[str] = set()
    for here, _dirs, _files in os.walk(tmp_path_factory.getbasetemp()):
        hashes.add(sha256_hex(os.path.abspath(here).encode())[:10])
    for path in ours:
        if path.rsplit("-", 1)[-1] not in hashes:
            continue
        for here, dirs, _files in os.walk(path, topdown=False):
            for child in [*dirs, ""]:
                try:
                    os.rmdir(os.path.join(here, child) if child else here)
                except OSError:  # busy (a process still in it) or gone
                    pass


@pytest.fixture(autouse=True)
def reap_agents() -> Iterator[None]:
    """Kill every agent process the test itself started and left running, pass or fail.

    Agents of module- or session-scoped fixtures were made before this fixture's
    set-up (pytest sets up wider scopes first) and are left to their fixture."""
    before = len(AgentProcess.CREATED)
    yield
    while len(AgentProcess.CREATED) > before:
        agent = AgentProcess.CREATED.pop()
        if agent.alive():
            agent.kill()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture
def observer(mosquitto: Mosquitto) -> Iterator[Observer]:
    with Observer(mosquitto.url) as obs:
        yield obs


# --- RabbitMQ: the one fixture, at the two scopes tests need ---------------------------
def _private_rabbit(workdir: Path, extra_conf: str) -> Iterator[Rabbit]:
    broker = Rabbit(workdir, extra_conf)
    try:
        yield broker.start()
    finally:
        broker.stop()  # also a node that failed to start


@pytest.fixture(scope="module")
def rabbit_conf() -> str:
    """Extra rabbitmq.conf lines for `rabbit` and `fresh_rabbit`. A module that needs
    more (TLS listeners: test_amqps.py) overrides this fixture with its own."""
    return ""


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory, rabbit_conf: str) -> Iterator[Rabbit]:
    """A private RabbitMQ shared by the tests of one module, which may kill -9 and restart
    it (it comes back on the same ports and data) or SIGSTOP it; each test uses names of
    its own. Without rabbitmq-server it stands for the machine's broker, which cannot be
    restarted (kill/restart skip the test)."""
    yield from _private_rabbit(tmp_path_factory.mktemp("rabbit"), rabbit_conf)


@pytest.fixture
def fresh_rabbit(tmp_path: Path, rabbit_conf: str) -> Iterator[Rabbit]:
    """A private RabbitMQ for one test alone: empty at its start, stopped at its end."""
    yield from _private_rabbit(tmp_path / "rabbit", rabbit_conf)
