"""The wheel as users install it: run from outside the checkout, in a fresh virtual environment.

`make install-check` builds the wheel, installs it (not editable) into a new
venv in a temporary directory and runs this script there, fed on stdin so
that the checkout is nowhere on `sys.path`. It runs the README's quick start
as written, on a model written without `keras.Input`, beside `AutoClip`; then
`read_run`, the `keras-vg report` command, and the TensorBoard plugin loaded
through its `tensorboard_plugins` entry point, serving its page and the run.

Usage: `python - CHECKOUT < tests/install_smoke.py`
"""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np

import keras_vg

checkout = os.path.realpath(sys.argv[1])
installed_from = os.path.realpath(keras_vg.__file__)
assert not installed_from.startswith(checkout + os.sep), f"keras_vg was imported from the checkout: {installed_from}"
import keras_vg.clipping  # noqa: E402,F401  (a subpackage: the wheel must ship it)

# The README's quick start, pasted as-is, with a model written the way tutorials write it.
with open(os.path.join(checkout, "README.md"), encoding="utf-8") as handle:
    quick_start = re.search(r"```python\n(.*?)```", handle.read(), re.S).group(1)
assert "GradientMonitor" in quick_start and "read_run" in quick_start, quick_start
rng = np.random.RandomState(0)
x = rng.randn(256, 8).astype("float32")
y = (x @ rng.randn(8, 1)).astype("float32")
model = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
namespace = {"model": model, "x": x, "y": y}
exec(quick_start, namespace)

steps, names, values = namespace["steps"], namespace["names"], namespace["values"]
optimizer_steps = int(model.optimizer.iterations.numpy())
np.testing.assert_array_equal(steps, np.arange(0, optimizer_steps, namespace["monitor"].every))
assert names == [v.path for v in model.trainable_variables], names
assert values.shape == (len(steps), len(names)) and np.all(np.isfinite(values))

# AutoClip beside the monitor, on a subclassed model never called before fit.
class Regressor(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="tanh")
        self.out = keras.layers.Dense(1)

    def call(self, inputs):
        return self.out(self.hidden(inputs))


model = Regressor()
model.compile(optimizer="sgd", loss="mse")
model.fit(x, y, epochs=2, verbose=0,
          callbacks=[keras_vg.GradientMonitor("logs/run2", every=4, verbose=0), keras_vg.AutoClip(verbose=0)])
run = keras_vg.read_run("logs/run2")
assert run.stat("grad_norm")[1] == [v.path for v in model.trainable_variables]
assert len(run.stat("clip_threshold")[0]) == int(model.optimizer.iterations.numpy()), "AutoClip's records"

report = subprocess.run([os.path.join(os.path.dirname(sys.executable), "keras-vg"), "report", "logs/run1"],
                        capture_output=True, text=True, check=True)
assert "keras-vg report for logs/run1" in report.stdout and "recorded steps 0-" in report.stdout, report.stdout

from tensorboard.backend import application  # noqa: E402
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer  # noqa: E402
from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug import test as werkzeug_test  # noqa: E402

(entry,) = [e for e in importlib.metadata.entry_points(group="tensorboard_plugins") if e.name == "keras_vg"]
multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"keras_vg": 0})
multiplexer.AddRunsFromDirectory("logs")
multiplexer.Reload()
provider = data_provider.MultiplexerDataProvider(multiplexer, "logs")
plugin = entry.load()().load(base_plugin.TBContext(logdir="logs", data_provider=provider))
client = werkzeug_test.Client(application.TensorBoardWSGI([plugin], data_provider=provider))
listing = json.loads(client.get("/data/plugins_listing").get_data(as_text=True))
assert listing["keras_vg"]["enabled"], listing
page = client.get("/data/plugin/keras_vg/static/index.js")
assert page.status_code == 200 and b"export" in page.get_data(), "the wheel ships the page"
runs = json.loads(client.get("/data/plugin/keras_vg/runs").get_data(as_text=True))
assert "run1" in json.dumps(runs) and "run2" in json.dumps(runs), runs
plugin.close()
print(f"install check passed: keras_vg {keras_vg.__version__} from {os.path.dirname(installed_from)}")
