"""Helpers shared by the tests and the benchmarks (which import them as `helpers.*` with
tests/ on sys.path): tiny and random models, engines, servers, a fake engine."""
