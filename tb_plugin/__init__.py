"""The keras-vg TensorBoard plugin: the Gradients tab.

TensorBoard finds it through the `tensorboard_plugins` entry point
`keras_vg = tb_plugin.loader:GradientsPluginLoader`. This package imports nothing
on import, so that TensorBoard starts even where TensorFlow is missing.
"""
