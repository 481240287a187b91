"""The 2020 tutorial's serving script; only the `import syft as sy` line is changed."""
import sys

import tensorflow as tf
from tensorflow.keras.layers import Activation, AveragePooling2D, Conv2D, Dense, Flatten
from tensorflow.keras.models import Sequential

import privatekeras as sy

hook = sy.KerasHook(tf.keras)

num_classes = 10
input_shape = (1, 28, 28, 1)

model = Sequential()
model.add(Conv2D(16, (3, 3), padding="same", batch_input_shape=input_shape))
model.add(AveragePooling2D((2, 2)))
model.add(Activation("relu"))
model.add(Conv2D(32, (3, 3), padding="same"))
model.add(AveragePooling2D((2, 2)))
model.add(Activation("relu"))
model.add(Conv2D(64, (3, 3), padding="same"))
model.add(AveragePooling2D((2, 2)))
model.add(Activation("relu"))
model.add(Flatten())
model.add(Dense(num_classes, name="logit"))

pre_trained_weights = sys.argv[1]
model.load_weights(pre_trained_weights)

hosts = sys.argv[2].split(",")
AUTO = True
alice = sy.TFEWorker(host=hosts[0], auto_managed=AUTO)
bob = sy.TFEWorker(host=hosts[1], auto_managed=AUTO)
carol = sy.TFEWorker(host=hosts[2], auto_managed=AUTO)

cluster = sy.TFECluster(alice, bob, carol)
cluster.start()

model.share(cluster)
model.serve(num_requests=3)

model.stop()
cluster.stop()
print("SYFT SERVE DONE", flush=True)
