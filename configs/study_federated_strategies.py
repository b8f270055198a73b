"""The federated strategy study's own strategy (configs/study-federated-smollm2.toml names it as
"configs/study_federated_strategies.py:MedianClippedFedAvg").

FedAvg with every owner's update clipped to the round's median update norm (norm bounding with an
adaptive threshold, after Sun et al., 2019): an owner whose skewed data pulls far from the others
moves the average no more than the typical owner does. No threshold to tune.
"""

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg


class MedianClippedFedAvg(FedAvg):
    def configure_train(self, server_round, arrays, config, grid):
        self.sent = {name: a.numpy() for name, a in arrays.items()}  # what every owner starts from
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = [msg for msg in replies if not msg.has_error()]
        updates = []
        for msg in replies:
            got = {name: a.numpy() for name, a in msg.content["arrays"].items()}
            updates.append({name: got[name].astype(np.float64) - self.sent[name] for name in got})
        norms = [np.sqrt(sum(float((u ** 2).sum()) for u in update.values())) for update in updates]
        bound = float(np.median(norms)) if norms else 0.0
        for msg, update, norm in zip(replies, updates, norms):
            scale = min(1.0, bound / (norm + 1e-12))
            msg.content["arrays"] = ArrayRecord({name: Array((self.sent[name] + scale * u).astype(self.sent[name].dtype))
                                                 for name, u in update.items()})
        return super().aggregate_train(server_round, replies)
