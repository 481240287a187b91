"""The model owner's process: start three workers, secret-share the model, serve, shut down."""
import sys

import privatekeras as pk

model_path, hosts, num_requests = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])

cluster = pk.Cluster(hosts)
cluster.start()
try:
    # weights are secret-shared from here; pixels lie in [0, 1] (values are bounded from it)
    shared = pk.share(model_path, cluster, input_range=(0, 1))
    print("owner: {}".format(shared), flush=True)
    shared.serve(num_requests=num_requests)       # blocks until every query is answered
    shared.stop()
finally:
    cluster.stop()
