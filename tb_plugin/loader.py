"""Entry module of the plugin, named by the `tensorboard_plugins` entry point.

TensorBoard imports every entry module at start-up without catching errors, so
an ImportError here would stop TensorBoard itself. This module therefore
imports only TensorBoard's `base_plugin`; the plugin (numpy, werkzeug,
`keras_vg.format`) is imported when TensorBoard asks for it, and a failure
there disables the Gradients tab with a warning instead.
"""

import logging

from tensorboard.plugins import base_plugin

logger = logging.getLogger(__name__)


class GradientsPluginLoader(base_plugin.TBLoader):
    """Builds the Gradients plugin.

    Example:

    ```
    # pyproject.toml
    [project.entry-points.tensorboard_plugins]
    keras_vg = "tb_plugin.loader:GradientsPluginLoader"
    ```
    """

    def load(self, context):
        """Returns a `GradientsPlugin`, preparing data from now on, or None (no tab) if it cannot be imported.

        Args:
            context: The `base_plugin.TBContext` from TensorBoard.

        Returns:
            A `tb_plugin.plugin.GradientsPlugin`, or None.
        """
        try:
            from tb_plugin.plugin import GradientsPlugin
        except ImportError as error:
            logger.warning("keras-vg: the Gradients tab is disabled: %s", error)
            return None
        plugin = GradientsPlugin(context)
        if context.data_provider is not None:
            plugin.start_preparing()
        return plugin
