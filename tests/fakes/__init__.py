"""The FAKE upstreams tests and benchmarks use: canned answers, fault injection, no model.

- `openai_upstream.py`: a minimal, fast OpenAI server (overhead benchmarks, fault injection);
- `recording_upstream.py`: the same, also recording what happened to each request.

Nothing they say is a real answer; a test that needs a real one uses a real vLLM server.
"""
