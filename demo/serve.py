"""The model owner's process: start three workers, secret-share the model, serve, shut down."""
import sys

import privatekeras as pk

model_path, hosts, num_requests = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])

cluster = pk.Cluster(hosts)
cluster.start()
try:
    shared = pk.share(model_path, cluster)        # weights are secret-shared from here
    print("owner: {}".format(shared), flush=True)
    shared.serve(num_requests=num_requests)       # blocks until every query is answered
    shared.stop()
finally:
    cluster.stop()
