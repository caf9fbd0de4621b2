"""An in-process Flower Grid: the ServerApp's messages handed straight to a ClientApp, one at a time.

flwr 1.42's simulation engine (`flwr.simulation.run_simulation`) has one backend, Ray
(`server/superlink/fleet/vce/vce_api.py` builds a RayBackend unconditionally; `pip install
"flwr[simulation]"` adds ray). Where ray is absent this Grid runs the same ServerApp and ClientApp
objects in this process: `clients` virtual nodes (node id = NODE_ID_BASE + partition), each with
Flower's `partition-id` / `num-partitions` node config, each message executed by the ClientApp as
Flower's runtimes do (`client_app(message, context)`), sequentially, which is also what a 2-core
machine affords. A client's exception propagates (an lmforge user error stays one line).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

NODE_ID_BASE = 1000
RUN_ID = 1


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any]):
        self.client_app = client_app
        self.contexts = {NODE_ID_BASE + p: Context(run_id=RUN_ID, node_id=NODE_ID_BASE + p,
                                                   node_config={"partition-id": p, "num-partitions": num_nodes},
                                                   state=RecordDict(), run_config=run_config)
                         for p in range(num_nodes)}
        self._run = Run.create_empty(RUN_ID)
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's grids number them
            context = self.contexts[message.metadata.dst_node_id]
            self._replies[message.metadata.message_id] = self.client_app(message, context)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_in_process(server_app: ServerApp, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any]) -> None:
    """Run `server_app` against `num_nodes` in-process ClientApp nodes."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID  # messages' sender
    grid = InProcessGrid(client_app, num_nodes, run_config)
    context = Context(run_id=RUN_ID, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                      run_config=run_config)
    server_app(grid, context)
