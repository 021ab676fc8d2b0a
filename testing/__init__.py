"""Test support that tests and benchmarks share (as httpx and Starlette ship theirs).

- `fake_upstream`: the one FAKE OpenAI upstream, a child process (canned answers, fault
  injection, records what happened to each request; no model: nothing it says is a real
  answer); its servers are `openai_upstream` and `recording_upstream`, which extends it.
- `vllm_process`: a real vLLM OpenAI server, started with the command `calibserve serve` gives
  its managed engine (server/engine.build_command), so tests run the engine calibserve launches.
- `servers`: calibserve itself, in this process (`InProcessServer`) or as a child
  (`CalibserveProcess`), in front of either.
- `checks`: reading /metrics and OpenAI's error shape.
- `checkpoints`: tiny related Llama checkpoints and multiple-choice data for the merge.

Nothing in the product imports this package; tests/ and benchmarks/ import it, never each other.
"""
