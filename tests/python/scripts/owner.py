"""Model-owner process for the end-to-end tests: start a cluster, share a model, serve."""
import argparse
import sys

import privatekeras as pk
from privatekeras.convert import load_model

p = argparse.ArgumentParser()
p.add_argument("--hosts", required=True)
p.add_argument("--model", required=True, help=".keras/.h5 path")
p.add_argument("--as-object", action="store_true", help="load the file, share the object")
p.add_argument("--batch-size", type=int, default=None)
p.add_argument("--num-requests", type=int, required=True)
p.add_argument("--protocol", default="aby3")
p.add_argument("--external-workers", action="store_true",
               help="the workers already run (started by the test): do not start them")
p.add_argument("--record-weight-shares", default=None, metavar="DIR",
               help="save, per shared weight, TFE's encoded clear value, the two seeds of its "
                    "first two shares and its third share (ABY3 only; test instrumentation)")
a = p.parse_args()


def record_weight_shares(directory):
    """Wrap ABY3._share while the weights are shared. TFE shares a secret w as
    share0 = PRF(seed0), share1 = PRF(seed1), share2 = w - share0 - share1, all computed in
    this process; worker 0 is sent (seed0, seed1), worker 1 (seed1, share2), worker 2
    (share2, seed0). Save, per weight, the encoded secret, seed0, seed1 and share2. Reads
    local tensors only, so it adds no network traffic. Returns a function that prints a
    timestamped RECORD SHARED marker, undoes the wrapping and writes the files."""
    import json
    import os

    import numpy as np
    from privatekeras.tfe_compat import import_tfe

    import_tfe()
    from tf_encrypted.operations import secure_random as crypto
    from tf_encrypted.protocol.aby3.aby3 import ABY3

    original, saved = ABY3._share, []

    def _share(self, secret, share_type, player=None):
        cls = type(secret)
        plain_sub, plain_seed, subs, seeds = cls.sub, crypto.secure_seed, [], []

        def sub(x, y):
            subs.append(plain_sub(x, y))
            return subs[-1]

        def secure_seed(*args, **kwargs):
            seeds.append(plain_seed(*args, **kwargs))
            return seeds[-1]

        cls.sub, crypto.secure_seed = sub, secure_seed
        try:
            shares = original(self, secret, share_type, player)
        finally:
            cls.sub, crypto.secure_seed = plain_sub, plain_seed
        assert len(seeds) == 2, len(seeds)
        third = subs[-1]  # share2 = secret - share0 - share1
        saved.append({"secret": secret.value.numpy(), "share2": third.value.numpy(),
                      "seed0": seeds[0].numpy(), "seed1": seeds[1].numpy(),
                      "devices": [t.device for t in (secret.value, third.value) + tuple(seeds)]})
        return shares

    ABY3._share = _share

    def finish():
        import time

        print("RECORD SHARED {:.6f}".format(time.monotonic()), flush=True)  # CLOCK_MONOTONIC
        ABY3._share = original
        os.makedirs(directory, exist_ok=True)
        for k, item in enumerate(saved):
            for name in ("secret", "share2", "seed0", "seed1"):
                np.save(os.path.join(directory, "{}_{}.npy".format(name, k)), item[name])
        with open(os.path.join(directory, "devices.json"), "w") as f:
            json.dump([item["devices"] for item in saved], f)

    return finish


cluster = pk.Cluster(a.hosts.split(","), auto_managed=not a.external_workers)
if not a.external_workers:
    cluster.start()
try:
    model = load_model(a.model) if a.as_object else a.model
    finish = record_weight_shares(a.record_weight_shares) if a.record_weight_shares else None
    shared = pk.share(model, cluster, protocol=a.protocol, batch_size=a.batch_size)
    if finish is not None:
        finish()
    print("SHARED", repr(shared), flush=True)
    print("SECURE_RANDOMNESS", pk.secure_randomness_active(), flush=True)
    n = shared.serve(num_requests=a.num_requests)
    print("SERVED", n, flush=True)
finally:
    cluster.stop()
sys.exit(0)
