"""Executor benchmarks: RemoteExecutor side by side with stock LocalExecutor and EdgeExecutor."""
