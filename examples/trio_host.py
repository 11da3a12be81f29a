"""A trio host: run the bundled example plugin on a backend, streaming one execution.

    python examples/trio_host.py --backend worker-pool

Shows the three things a host does: execute and read the result, handle a structured error,
and stream an execution's events as they happen.
"""

from __future__ import annotations

import argparse

import trio

from plugin_execution import (
    ExecutionError,
    ExecutionRequest,
    PluginRegistry,
    create_execution_backend,
)


async def main(backend_type: str) -> None:
    registry = PluginRegistry.from_entry_points()  # installed plugins: examples.hello
    async with create_execution_backend(type=backend_type, registry=registry) as backend:
        result = await backend.execute(
            ExecutionRequest(
                plugin_id="examples.hello",
                handler_id="greet",
                input={"name": "trio"},
                context={"host": "cli", "request_id": "r-1"},
            )
        )
        print(f"{result.output['greeting']} ({result.duration_s * 1000:.1f} ms)")

        try:
            await backend.execute(ExecutionRequest(plugin_id="examples.hello", handler_id="nope"))
        except ExecutionError as error:
            print(f"error {error.code}: {error.message}")

        request = ExecutionRequest(
            plugin_id="examples.hello", handler_id="countdown", input={"from": 3}
        )
        async with backend.open_execution(request) as execution:
            async for event in execution.events:
                print(f"event {event.kind}: {event.data}")
            print(f"result: {(await execution.result()).output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backend", default="in-process", choices=("in-process", "worker-pool", "subprocess")
    )
    trio.run(main, parser.parse_args().backend)
