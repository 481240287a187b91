"""The client's process: share each image locally, reconstruct its logits locally."""
import os
import sys
import time

import numpy as np

import privatekeras as pk
from privatekeras.data import LABELS

out_dir, hosts = sys.argv[1], sys.argv[2].split(",")
images = np.load(os.path.join(out_dir, "images.npy"))
labels = np.load(os.path.join(out_dir, "labels.npy"))
plain = np.load(os.path.join(out_dir, "plaintext_logits.npy"))

cluster = pk.Cluster(hosts, auto_managed=False)   # the same three addresses; not started here
client = pk.connect(cluster, input_shape=(1, 28, 28, 1), output_shape=(1, 10), timeout=300)

logits, seconds = [], []
for image, label in zip(images, labels):
    t = time.monotonic()
    res = client.query(image[None])               # numpy in, numpy logits out
    seconds.append(time.monotonic() - t)
    logits.append(res[0])
    print("Actual: {} ({}), predicted: {} ({})".format(
        label, LABELS[label], res.argmax(), LABELS[res.argmax()]), flush=True)

logits = np.array(logits)
agree = (logits.argmax(1) == plain.argmax(1)).mean()
err = np.abs(logits - plain).max()
print("client: {} private predictions; argmax agreement with plaintext Keras {:.0%}; max abs "
      "logit error {:.4f}; median query {:.0f} ms (first {:.1f} s)".format(
          len(logits), agree, err, 1000 * np.median(seconds[1:] or seconds), seconds[0]),
      flush=True)
sys.exit(0 if agree == 1.0 else 1)
