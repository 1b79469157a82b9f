"""One of the processes of `test_jax_distributed.py`: data parallel over processes on loopback.

Usage: `python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT LOG_DIR`. Each process feeds its
part of every global batch; every process runs GradientMonitor and AutoClip into the same `log_dir`.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

process_id, processes, port, log_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=processes, process_id=process_id)

import keras  # noqa: E402
from test_jax_distributed import BATCH, build, callbacks, data  # noqa: E402

distribution = keras.distribution.DataParallel(devices=jax.devices())
distribution.auto_shard_dataset = False  # each process feeds its own part below
keras.distribution.set_distribution(distribution)
x, y = data()
part = BATCH // processes
local = [a.reshape(-1, processes, part, a.shape[-1])[:, process_id].reshape(-1, a.shape[-1]) for a in (x, y)]
model = build()
model.fit(*local, batch_size=part, epochs=1, shuffle=False, verbose=0,
          callbacks=callbacks(log_dir))
print(f"process {process_id} trained {int(model.optimizer.iterations.numpy())} steps", flush=True)
