"""The 2020 tutorial's client script; only the `import syft as sy` line is changed."""
import sys

import numpy as np

import privatekeras as sy

hosts = sys.argv[2].split(",")
AUTO = True
alice = sy.TFEWorker(host=hosts[0], auto_managed=AUTO)
bob = sy.TFEWorker(host=hosts[1], auto_managed=AUTO)
carol = sy.TFEWorker(host=hosts[2], auto_managed=AUTO)

cluster = sy.TFECluster(alice, bob, carol)

client = sy.TFEWorker()

input_shape = (1, 28, 28, 1)
output_shape = (1, 10)

client.connect_to_model(input_shape, output_shape, cluster)

images = np.load(sys.argv[1])
labels = np.load(sys.argv[1].replace("images", "labels"))
for image, label in zip(images[:3], labels[:3]):
    res = client.query_model(image.reshape(1, 28, 28, 1))
    print(f"Actual: {label}, predicted: {np.argmax(res)}", flush=True)
