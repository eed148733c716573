"""Networks (MONAI UNet, DynUNet, SegResNet and our ClassicUNet), their specs and the model-folder loader."""
from pipeline.models.classic_unet import ClassicUNet
from pipeline.models.factory import NETWORKS, build_network, downsampling_factor, network_spec
from pipeline.models.folder import MODEL_FORMAT, read_model_spec
from pipeline.models.loader import ModelBundle, load_model_folder

__all__ = ["ClassicUNet", "NETWORKS", "build_network", "downsampling_factor", "network_spec", "MODEL_FORMAT",
           "ModelBundle",
           "load_model_folder", "read_model_spec"]
