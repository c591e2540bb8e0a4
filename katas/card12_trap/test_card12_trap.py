"""card12: the interview trap.

Every answer is checked on the output of kvref's serving simulator (`kvref.serving_sim.simulate`):
requests served with iteration-level batching under a K/V memory budget, either with a static
reservation of max_seq_len slots per request or with paged blocks allocated on demand. The
capacity is the completion rate the simulator measures on a saturated queue; the trap is the
simulator's queue growing under Poisson arrivals faster than that capacity, while paging on the
same trace and the same memory keeps up; Little's law is checked on the simulator's own log of
the number of requests in the system.
"""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import kvkata
from kvkata.check import call_str, expect, expect_real, plural
from kvref.config import ModelConfig
from kvref.hardware import H100_SXM
from kvref.serving_sim import SimConfig, TraceRequest, percentile, poisson_trace, simulate

impl = kvkata.load("card12_trap.trap")

# A small model: one token's K and V in every layer is 2 x 2 layers x 2 KV heads x 8 dims x 2 bytes.
CFG = ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=32, max_seq_len=64)
SLOT_BYTES = 2 * 2 * 2 * 8 * 2


def sim(budget_tokens: int, policy: str, max_seq_len: int, step_time: float, **kw) -> SimConfig:
    return SimConfig(CFG, H100_SXM, budget_tokens * SLOT_BYTES, policy=policy, max_seq_len=max_seq_len,
                     step_time=step_time, **kw)


# --- the capacity of static reservation ---------------------------------------------------------

@pytest.mark.kata("static_capacity_rps")
@given(data=st.data(), max_seq_len=st.integers(2, 300), step_time=st.floats(1e-4, 0.1))
# Explicit examples give (kv_budget_tokens, output_len, prompt_len) in place of the draws.
@example(data=(4600, 64, 100), max_seq_len=1024, step_time=0.01)  # the worked example: 4.49 seats run as 4
@example(data=(3900, 50, 10), max_seq_len=1024, step_time=0.01)  # 3.81 seats run as 3, not round()'s 4
def test_static_capacity_rps_is_the_completion_rate_of_a_saturated_simulator(data, max_seq_len, step_time):
    if isinstance(data, tuple):
        budget, output_len, prompt_len = data
    else:
        budget = data.draw(st.integers(max_seq_len, 8 * max_seq_len + max_seq_len - 1), label="kv_budget_tokens")
        output_len = data.draw(st.integers(1, max_seq_len), label="output_len")
        prompt_len = data.draw(st.integers(1, max_seq_len - output_len + 1), label="prompt_len")
    concurrent = budget // max_seq_len
    trace = [TraceRequest(i, 0.0, prompt_len, output_len) for i in range(3 * concurrent)]  # all queued at t = 0
    result = simulate(trace, sim(budget, "static", max_seq_len, step_time))
    measured = len(trace) / result.makespan
    got = impl.static_capacity_rps(budget, max_seq_len, output_len, step_time)
    expect_real(call_str("static_capacity_rps", budget, max_seq_len, output_len, step_time), got, measured, rel=1e-9,
                why=f"the simulator completed {len(trace)} requests (prompts of {prompt_len}, {output_len} new tokens, all "
                f"queued at t = 0) in {result.makespan:.6g} s with at most {result.summary()['max_batch']} running at once")


def queue_at_last_arrival(trace, result) -> int:
    last = trace[-1].arrival
    return [s.waiting for s in result.steps if s.start <= last][-1]


@pytest.mark.kata("static_capacity_rps")
@pytest.mark.parametrize("seed", [0, 1])
def test_static_capacity_rps_separates_a_bounded_queue_from_a_growing_one(seed):
    """Poisson arrivals at 0.6 and at 1.6 times your capacity, 400 requests, on the simulator."""
    budget, max_seq_len, output_len, step_time = 4600, 1024, 64, 0.01
    got = impl.static_capacity_rps(budget, max_seq_len, output_len, step_time)
    call = call_str("static_capacity_rps", budget, max_seq_len, output_len, step_time)
    expect(isinstance(got, float) and got > 0, call, got, "a rate above 0 requests/s, as a float")
    for factor, grows in ((0.6, False), (1.6, True)):
        trace = poisson_trace(400, factor * got, (16, 128), (output_len, output_len), seed=seed)
        result = simulate(trace, sim(budget, "static", max_seq_len, step_time))
        queued = queue_at_last_arrival(trace, result)
        expect(queued > 100 if grows else queued < 20, call, got,
               f"a capacity such that arrivals at {factor} times it make the queue {'grow' if grows else 'stay short'}: "
               f"with Poisson arrivals at {factor * got:.4g} requests/s, {queued} of 400 requests were waiting when the "
               f"last one arrived (median time to first token {percentile(result.ttft(), 50):.3g} s)")


@pytest.mark.kata("static_capacity_rps")
def test_static_capacity_rps_is_the_trap_that_paging_the_same_memory_escapes():
    """Above the static capacity, the static server's queue grows; the same trace on the same
    memory, paged in blocks of 16, runs several times the batch and keeps up."""
    budget, max_seq_len, output_len, step_time = 4600, 1024, 64, 0.01
    got = impl.static_capacity_rps(budget, max_seq_len, output_len, step_time)
    call = call_str("static_capacity_rps", budget, max_seq_len, output_len, step_time)
    trace = poisson_trace(400, 1.6 * got, (16, 128), (output_len, output_len), seed=5)
    static = simulate(trace, sim(budget, "static", max_seq_len, step_time))
    paged = simulate(trace, sim(budget, "paged", max_seq_len, step_time))
    s, p = static.summary(), paged.summary()
    expect(queue_at_last_arrival(trace, static) > 100 and queue_at_last_arrival(trace, paged) < 20
           and p["throughput_tok_s"] > 1.4 * s["throughput_tok_s"], call, got,
           f"arrivals at 1.6 times the static capacity: static ran at most {s['max_batch']} requests a step, "
           f"wasted {s['mem_waste']:.0%} of its reserved slots, served {s['throughput_tok_s']:.0f} tokens/s with a "
           f"median time to first token of {s['ttft_p50']:.3g} s; paged ran up to {p['max_batch']}, wasted "
           f"{p['mem_waste']:.1%}, served {p['throughput_tok_s']:.0f} tokens/s, median TTFT {p['ttft_p50']:.3g} s")


# --- Little's law ----------------------------------------------------------------------------

RUNS = st.fixed_dictionaries({
    "n": st.integers(1, 60), "rate": st.floats(0.5, 40), "seed": st.integers(0, 2**16),
    "policy": st.sampled_from(["static", "paged"]), "budget": st.integers(300, 3000),
})


def run(params):
    trace = poisson_trace(params["n"], params["rate"], (1, 100), (1, 100), seed=params["seed"])
    return trace, simulate(trace, sim(params["budget"], params["policy"], 200, 0.01))


@pytest.mark.kata("mean_in_system")
@given(params=RUNS, cut=st.floats(0.01, 1.2))
@example(params={"n": 30, "rate": 20.0, "seed": 1, "policy": "static", "budget": 600}, cut=0.5)
def test_mean_in_system_is_the_time_average_of_the_simulators_occupancy_log(params, cut):
    trace, result = run(params)
    arrivals = [r.arrival for r in result.requests]
    departures = [r.finish for r in result.requests]
    horizon = cut * max(departures)
    got = impl.mean_in_system(arrivals, departures, horizon)
    inside = sum(a <= horizon for a in arrivals)
    still = sum(a <= horizon < d for a, d in zip(arrivals, departures))
    expect_real(call_str("mean_in_system", arrivals, departures, horizon), got, result.time_average_in_system(horizon),
                rel=1e-9, abs=1e-12,
                why=f"the integral over [0, {horizon:.4g}] s of the number in the system, from the simulator's log of "
                f"every arrival and departure, over the horizon: {plural(inside, 'request')} arrived by then and "
                f"{still} had not left")


@pytest.mark.kata("mean_in_system")
@given(params=RUNS)
@example(params={"n": 60, "rate": 40.0, "seed": 3, "policy": "static", "budget": 300})
def test_mean_in_system_is_arrival_rate_times_mean_time_in_system_on_a_run_that_drains(params):
    trace, result = run(params)
    arrivals = [r.arrival for r in result.requests]
    departures = [r.finish for r in result.requests]
    horizon = max(departures)  # the run starts and ends empty: Little's law holds exactly
    got = impl.mean_in_system(arrivals, departures, horizon)
    lam, w = len(arrivals) / horizon, sum(result.time_in_system()) / len(arrivals)
    expect_real(call_str("mean_in_system", arrivals, departures, horizon), got, lam * w, rel=1e-9,
                why=f"Little's law on the simulator's run of {plural(len(arrivals), 'request')}: λ = {lam:.4g} requests/s "
                f"over the {horizon:.4g} s run, W = {w:.4g} s mean time in the system")


@pytest.mark.kata("mean_in_system")
def test_mean_in_system_of_three_requests_by_hand():
    """In the system: [0, 2), [1, 4) and [3, 9); horizon 5: 2 + 3 + 2 = 7 request-seconds over 5 s."""
    got = impl.mean_in_system([0.0, 1.0, 3.0], [2.0, 4.0, 9.0], 5.0)
    expect_real(call_str("mean_in_system", [0.0, 1.0, 3.0], [2.0, 4.0, 9.0], 5.0), got, 1.4, rel=1e-12,
                why="7 request-seconds inside [0, 5] (the third request's last 4 s lie past the horizon), over 5 s")
    got = impl.mean_in_system([0.0, 6.0], [1.0, 7.0], 5.0)
    expect_real(call_str("mean_in_system", [0.0, 6.0], [1.0, 7.0], 5.0), got, 0.2, rel=1e-12,
                why="1 request-second inside [0, 5]: the second request arrives after the horizon")
