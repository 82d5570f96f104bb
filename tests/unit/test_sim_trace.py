"""``gpufleet simulate --trace FILE --config config.toml``: a user's trace on the user's pools.

Every trace and config here is written by the test. Boot times are pinned (the provider table
is patched to fixed ranges) so the expected numbers can be worked out by hand.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gpufleet.cli import app
from gpufleet.domain import ProviderKind
from gpufleet.scaling.history import Histogram, PoolHistory
from gpufleet.scaling.sim import pools as sim_pools
from gpufleet.scaling.sim.traces import TraceError, parse_arrival, read_trace

runner = CliRunner()

NOVITA_POOL = """
[[pools]]
name = "img"
provider = "novita"
engine = "comfyui"
product_id = "p1"
image = "img:latest"
max_workers = 1
price_per_hour = 1.0
idle_timeout_s = {idle}
park_timeout_s = 0
"""


@pytest.fixture
def fixed_boots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Novita creates take exactly 100 s and starts exactly 50 s."""
    pinned = sim_pools.BootTimes((100.0, 100.0), (50.0, 50.0), "pinned by the test")
    monkeypatch.setitem(sim_pools.BOOT_DEFAULTS, ProviderKind.novita, pinned)  # type: ignore[arg-type]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def simulate(*args: str) -> Any:
    return runner.invoke(app, ["simulate", *args])


def as_json(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert isinstance(doc, dict)
    return doc


def test_two_jobs_on_one_worker_match_the_hand_computed_numbers(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    # unsorted on purpose: the replay sorts by arrival
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n1700000020,50\n1700000000,100\n")
    doc = as_json(simulate("--trace", str(trace), "--config", str(config), "--json"))
    (pool,) = doc["pools"]
    assert (pool["name"], pool["jobs"]) == ("img", 2)
    row = pool["rows"][0]
    assert row["policy"].startswith("gpufleet (as configured")
    # t=0 job 1 arrives, a worker is created: boots 0-100 s; job 2 arrives at 20 s and waits
    # (max_workers = 1). Job 1 runs 100-200 s, job 2 200-250 s; then it idles 250-310 s (idle
    # 60 s), is stopped, parked one 5 s tick (park_timeout_s = 0) and deleted at 315 s — but
    # every policy is billed only up to its last job's end (250 s): the tail is where the
    # trace stops, not what serving it cost.
    running_s = 100 + 150
    cost = running_s / 3600 * 1.0
    waits = [100.0, 180.0]  # job 1 waits for the boot, job 2 until 200 s
    assert row["cost_usd"] == pytest.approx(cost)
    assert row["gpu_hours"] == pytest.approx(running_s / 3600)
    assert row["idle_gpu_hours"] == pytest.approx(0.0)
    assert (row["p50_s"], row["p95_s"], row["p99_s"]) == (180.0, 180.0, 180.0)
    assert row["boots"] == 1
    assert row["actions"] == 4  # create, drain, stop, delete
    assert row["score_usd"] == pytest.approx(cost + sum(waits) / 3600 * 1.0)  # wait at price
    assert row["usd_per_succeeded"] == pytest.approx(cost / 2)
    # the clairvoyant bound starts cold too: job 1 once the fastest create (100 s) is up, job 2
    # when job 1 ends (one worker): 100-250 s busy plus that create, 100 s
    bound = pool["rows"][-1]
    assert bound["policy"] == "e: clairvoyant"
    assert bound["cost_usd"] == pytest.approx(250 / 3600)
    assert row["x_clairvoyant"] == pytest.approx(cost / (250 / 3600))
    # and the markdown table prints the same row
    text = simulate("--trace", str(trace), "--config", str(config)).stdout
    assert f"| {row['policy']} | {cost + 280 / 3600:.2f} | {cost:.2f} |" in text
    assert "| 180 | 180 | 180 | 1 |" in text


def test_json_lines_trace_replays_like_the_csv(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    csv_trace = write(
        tmp_path, "t.csv", "arrival,service_s,model\n2023-11-14T22:13:20Z,100,m\n1700000020,50,m\n"
    )
    jsonl = write(
        tmp_path,
        "t.jsonl",
        '{"arrival": "2023-11-14T22:13:20+00:00", "service_s": 100, "model": "m"}\n'
        "\n"
        '{"arrival": 1700000020, "service_s": "50", "model": "m", "kind": "comfyui"}\n',
    )
    from_csv = as_json(simulate("--trace", str(csv_trace), "--config", str(config), "--json"))
    from_jsonl = as_json(simulate("--trace", str(jsonl), "--config", str(config), "--json"))
    assert from_csv["pools"][0]["rows"] == from_jsonl["pools"][0]["rows"]
    assert from_csv["pools"][0]["rows"][0]["p95_s"] == 180.0


def test_json_output_parses_and_carries_the_suggestion(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n0,100\n20,50\n")
    doc = as_json(simulate("--trace", str(trace), "--config", str(config), "--json"))
    suggestion = doc["pools"][0]["suggestion"]
    assert suggestion["pool"] == "img"
    assert suggestion["configured"]["idle_timeout_s"] == 60.0
    assert suggestion["suggested"]["score_usd"] <= suggestion["configured"]["score_usd"]
    assert set(suggestion["delta"]) == {"score_usd", "cost_usd", "p95_s"}
    assert suggestion["search"] == "full"
    assert suggestion["replayed"] == 48
    pasted = tomllib.loads(suggestion["toml"])
    assert pasted == {
        k: suggestion["suggested"][k] for k in ("idle_timeout_s", "target_wait_s", "min_workers")
    }
    rows = doc["pools"][0]["rows"]
    assert [r["policy"][:2] for r in rows[3:]] == ["a:", "b:", "c:", "d:", "e:"]


def test_progress_is_quiet_when_stderr_is_not_a_terminal(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n0,100\n20,50\n")
    result = simulate("--trace", str(trace), "--config", str(config), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert result.stdout.startswith("# gpufleet simulate --trace")
    assert (tmp_path / "report.md").read_text().strip() == result.stdout.strip()
    assert json.loads((tmp_path / "report.json").read_text())["pools"][0]["name"] == "img"


def test_the_old_module_path_still_answers():
    from gpufleet.scaling import sim
    from gpufleet.scaling import simulate as old

    assert old.policies is sim.policies
    assert old.clairvoyant is sim.clairvoyant
    assert old.main is sim.main


@pytest.mark.parametrize("search", ["full", "axes"])
def test_the_suggestion_keeps_a_worker_warm_when_that_clearly_wins(tmp_path, fixed_boots, search):
    # A job of 10 s every 90 s for 3 hours. Configured to stop after 30 s idle, every job
    # waits for a 50 s start (and the worker is billed nearly all the time anyway); any
    # setting that keeps it warm (idle >= 120 s, "auto", or min_workers = 1) bills about the
    # same and nobody waits.
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=30))
    rows = "".join(f"{1700000000 + 90 * i},10\n" for i in range(120))
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n" + rows)
    doc = as_json(
        simulate("--trace", str(trace), "--config", str(config), "--json", "--grid", search)
    )
    s = doc["pools"][0]["suggestion"]
    assert s["search"] == search
    assert s["configured"]["idle_timeout_s"] == 30.0
    assert s["configured"]["p95_s"] >= 50.0  # every job waits for a start
    assert s["changed"] is True
    chosen = s["suggested"]
    assert chosen["idle_timeout_s"] in ("auto", 120.0, 300.0, 600.0) or chosen["min_workers"] == 1
    assert chosen["p95_s"] < 10.0
    # the waiting saved (~120 jobs x 50 s at $1/h) dominates: the score drops by over $1
    assert s["delta"]["score_usd"] < -1.0
    assert tomllib.loads(s["toml"])["idle_timeout_s"] == chosen["idle_timeout_s"]
    if search == "axes":
        assert s["replayed"] < 48


def bad(result: Any) -> str:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    return str(result.stderr)


def test_malformed_csv_rows_are_reported_by_line_and_stop_the_run(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    trace = write(
        tmp_path,
        "trace.csv",
        "arrival,service_s,model\n"
        "1700000000,10,m\n"  # line 2: fine
        "yesterday,10,m\n"  # line 3: unparsable time
        "1700000100,-5,m\n"  # line 4: negative service
        "1700000200,nan,m\n"  # line 5: NaN service
        "1700000300\n"  # line 6: a field short
        "1700000400,10,m,extra\n"  # line 7: a field too many
        ",10,m\n"  # line 8: no arrival
        "1700000500,ten,m\n",  # line 9: service not a number
    )
    err = bad(simulate("--trace", str(trace), "--config", str(config)))
    assert "7 problem(s)" in err
    for line, words in [
        (3, "'yesterday' is neither epoch seconds nor an ISO 8601 time"),
        (4, "negative"),
        (5, "not a finite number"),
        (6, "fewer fields"),
        (7, "more fields"),
        (8, "arrival is empty"),
        (9, "not a number"),
    ]:
        assert any(f"line {line}: " in e and words in e for e in err.splitlines()), (line, err)
    assert "line 2:" not in err


def test_a_csv_without_the_required_columns_is_refused_at_line_1(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    trace = write(tmp_path, "trace.csv", "time,duration\n1700000000,10\n")
    err = bad(simulate("--trace", str(trace), "--config", str(config)))
    assert "line 1: header lacks column(s) arrival, service_s" in err


def test_malformed_json_lines_are_reported_by_line(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    trace = write(
        tmp_path,
        "trace.jsonl",
        '{"arrival": 1700000000, "service_s": 10}\n'  # 1: fine
        "{not json\n"  # 2
        "[1, 2]\n"  # 3: not an object
        '{"arrival": 1700000000}\n'  # 4: no service_s
        '{"arrival": true, "service_s": 10}\n'  # 5: a boolean is no time
        '{"arrival": "2023-13-45T00:00:00", "service_s": 10}\n'  # 6: no such date
        '{"arrival": 1700000000, "service_s": -1}\n'  # 7: negative
        '{"arrival": 1700000000, "service_s": 10, "model": 7}\n',  # 8: model not a string
    )
    err = bad(simulate("--trace", str(trace), "--config", str(config)))
    for line, words in [
        (2, "not JSON"),
        (3, "not a JSON object"),
        (4, "lacks field(s) service_s"),
        (5, "not a time"),
        (6, "neither epoch seconds nor an ISO 8601 time"),
        (7, "negative"),
        (8, "model 7 is not a string"),
    ]:
        assert any(f"line {line}: " in e and words in e for e in err.splitlines()), (line, err)
    assert "line 1:" not in err


TWO_POOLS = """
[[pools]]
name = "img"
provider = "novita"
engine = "comfyui"
product_id = "p1"
image = "img:latest"
max_workers = 2
price_per_hour = 1.0

[[pools]]
name = "img2"
provider = "novita"
engine = "comfyui"
product_id = "p2"
image = "img:latest"
models = ["flux"]
max_workers = 2
price_per_hour = 2.0
"""


def test_rows_that_fit_no_pool_are_errors_with_their_lines(tmp_path, fixed_boots):
    config = write(tmp_path, "config.toml", TWO_POOLS)
    trace = write(
        tmp_path,
        "trace.csv",
        "arrival,service_s,model,pool,kind\n"
        "1700000000,10,sdxl,img,comfyui\n"  # 2: fine, named
        "1700000000,10,flux,,comfyui\n"  # 3: both pools serve flux: ambiguous
        "1700000000,10,sdxl,gpu9,\n"  # 4: no such pool
        "1700000000,10,,,ollama\n"  # 5: no ollama pool
        "1700000000,10,sdxl,img2,\n"  # 6: img2 serves flux only
        "1700000000,10,,,video\n",  # 7: not a kind
    )
    err = bad(simulate("--trace", str(trace), "--config", str(config)))
    assert "line 3: kind comfyui, model flux: 2 pools could serve it" in err
    assert "line 4: pool 'gpu9' is not configured (img, img2)" in err
    assert "line 5: kind ollama, model -: no pool serves it" in err
    assert "line 6: pool img2" in err
    assert "does not serve" in err
    assert "line 7: kind 'video' is not one of" in err
    assert "line 2:" not in err
    # --pool settles the rows that name no pool; an unknown --pool is an error
    assert bad(simulate("--trace", str(trace), "--config", str(config), "--pool", "nope"))
    ok = write(tmp_path, "ok.csv", "arrival,service_s,model\n1700000000,10,flux\n")
    doc = as_json(simulate("--trace", str(ok), "--config", str(config), "--pool", "img2", "--json"))
    assert [p["name"] for p in doc["pools"]] == ["img2"]
    assert doc["idle_pools"] == ["img"]


def test_a_rented_pool_without_a_price_is_a_clear_error(tmp_path, fixed_boots):
    config = write(
        tmp_path,
        "config.toml",
        NOVITA_POOL.format(idle=60).replace("price_per_hour = 1.0\n", ""),
    )
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n0,10\n")
    err = bad(simulate("--trace", str(trace), "--config", str(config)))
    assert "pool img: price_per_hour is not set" in err


def test_surf_pools_resume_paused_workspaces_and_static_pools_never_boot(tmp_path):
    config = write(
        tmp_path,
        "config.toml",
        """
[[pools]]
name = "llm"
provider = "surf"
engine = "ollama"
name_filter = "gpu"
max_workers = 1
price_per_hour = 2.0

[[pools]]
name = "local"
provider = "static"
engine = "comfyui"
urls = ["http://10.0.0.5:8188"]
price_per_hour = 0.5
""",
    )
    trace = write(
        tmp_path,
        "trace.csv",
        "arrival,service_s,kind\n1700000000,30,ollama\n1700000000,40,comfyui\n"
        "1700000010,20,comfyui\n",
    )
    doc = as_json(simulate("--trace", str(trace), "--config", str(config), "--json"))
    by_name = {p["name"]: p for p in doc["pools"]}
    surf, static = by_name["llm"], by_name["local"]
    assert surf["boot_times"]["create_s"] is None
    assert surf["boot_times"]["revive_s"] == [45, 75]
    assert [r["policy"][:8] for r in surf["rows"]][:3] == ["gpufleet"] * 3  # no create-baselines
    assert surf["rows"][0]["boots"] == 1  # the paused workspace was resumed, none created
    assert 45.0 <= surf["rows"][0]["p95_s"] <= 75.0
    assert static["suggestion"] is None
    assert len(static["rows"]) == 1
    row = static["rows"][0]
    # always on from the first arrival: job 1 runs 0-40 s, job 2 waits 30 s and ends at 60 s
    assert (row["boots"], row["p95_s"]) == (0, 30.0)
    # billed while the replay runs: to the end of job 2, plus at most the one 5 s tick at
    # which the replay re-checks the policy's past-due timer before it stops
    assert row["cost_usd"] == pytest.approx(row["gpu_hours"] * 0.5)
    assert 60 / 3600 <= row["gpu_hours"] <= 65 / 3600 + 1e-12


def test_trace_reader_accepts_iso_and_epoch_and_sorts():
    assert parse_arrival("2023-11-14T22:13:20Z") == 1700000000.0
    assert parse_arrival("2023-11-14 22:13:20") == 1700000000.0  # no zone: UTC
    assert parse_arrival(1700000000) == parse_arrival("1700000000.0") == 1700000000.0
    with pytest.raises(ValueError, match="must be >= 0"):
        parse_arrival(-1)
    with pytest.raises(ValueError, match="not a time"):
        parse_arrival(math.inf)


def test_reading_an_empty_trace_is_an_error(tmp_path):
    with pytest.raises(TraceError, match="no rows"):
        read_trace(write(tmp_path, "empty.csv", "arrival,service_s\n"))
    rows = read_trace(write(tmp_path, "t.csv", "arrival,service_s\n20,1\n10,2\n"))
    assert [(r.line, r.arrival_s) for r in rows] == [(3, 10.0), (2, 20.0)]


def test_boot_times_from_history_use_recorded_boots_when_there_are_enough():
    h = PoolHistory(
        boot_s={
            "create": Histogram.from_samples([200.0] * 10),
            "revive": Histogram.from_samples([60.0]),
        }
    )
    create, revive = sim_pools.boot_times_from_history(h)
    assert create is not None
    assert 170.0 < create[0] <= create[1] < 240.0
    assert revive is None  # one boot is not enough: the provider default is used


def test_history_dump_sets_the_replayed_boot_times(tmp_path, fixed_boots):
    from gpufleet.scaling.history import bucket_of

    config = write(tmp_path, "config.toml", NOVITA_POOL.format(idle=60))
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n0,10\n")
    b = bucket_of(200.0)
    dump = write(tmp_path, "h.json", json.dumps({"pools": {"img": {"boot:create": {b: 12}}}}))
    doc = as_json(
        simulate("--trace", str(trace), "--config", str(config), "--history", str(dump), "--json")
    )
    boots = doc["pools"][0]["boot_times"]
    assert boots["source"] == "recorded history"
    assert 170.0 < boots["create_s"][0] < 240.0
    assert boots["revive_s"] == [50.0, 50.0]  # no revives recorded: the (pinned) default
    assert doc["pools"][0]["rows"][0]["p95_s"] == pytest.approx(boots["create_s"][0], rel=0.2)
    junk = write(tmp_path, "junk.json", "[1]")
    err = bad(simulate("--trace", str(trace), "--config", str(config), "--history", str(junk)))
    assert "not a history dump" in err


def test_parked_price_per_gb_is_the_reconcilers():
    from gpufleet.scaling import reconciler

    assert sim_pools.NOVITA_DISK_USD_PER_GB_HOUR == reconciler.NOVITA_DISK_USD_PER_GB_HOUR


def test_trace_only_flags_need_a_trace():
    result = simulate("--json", "--only", "bursty")
    assert result.exit_code == 2
    assert "go with --trace FILE" in result.stderr


def test_rows_for_a_pool_that_can_never_run_them_are_an_error(tmp_path, fixed_boots):
    config = write(
        tmp_path,
        "config.toml",
        NOVITA_POOL.format(idle=60).replace("max_workers = 1", "max_workers = 0"),
    )
    trace = write(tmp_path, "trace.csv", "arrival,service_s\n0,10\n5,10\n")
    err = bad(simulate("--trace", str(trace), "--config", str(config)))
    assert "pool img has max_workers = 0: its rows (lines 2, 3) would never run" in err
