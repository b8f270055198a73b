"""FedAvg with each owner's update clipped to an L2 norm before averaging (the example of
docs/strategies.md): one owner with a huge or poisoned update cannot move the model far."""

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg


class ClippedFedAvg(FedAvg):
    def __init__(self, max_norm: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_norm = max_norm

    def configure_train(self, server_round, arrays, config, grid):
        self.sent = {name: a.numpy() for name, a in arrays.items()}  # what every owner starts from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if msg.has_error():
                continue
            got = {name: a.numpy() for name, a in msg.content["arrays"].items()}
            update = {name: got[name] - self.sent[name] for name in got}
            norm = np.sqrt(sum(float((u.astype(np.float64) ** 2).sum()) for u in update.values()))
            scale = min(1.0, self.max_norm / (norm + 1e-12))
            msg.content["arrays"] = ArrayRecord(
                {name: Array((self.sent[name] + scale * u).astype(got[name].dtype)) for name, u in update.items()})
        return super().aggregate_train(server_round, replies)
