"""Writes the PyTorch fixtures of tests/test_torch_import.py (needs PyTorch; the tests do not).

  python tests/data/make_torch_fixtures.py      # rewrites tests/data/torch_*.{pt,pth,npz}

Tiny networks with ml-fct's structure and parameter names, written here in PyTorch from the architecture ml-fct
describes (apple/ml-fct models/resnet.py and models/transformations.py; none of its code is copied):

* ``torch_resnet18_tiny.pt``: basic-block ResNet [2, 2, 2, 2], width 2, embedding 8, 4 classes, classifier a
  bias-free 1×1 conv, saved as ml-fct saves backbones: TorchScript of a wrapper whose ``model`` is the ResNet.
* ``torch_resnet50_tiny.pth``: bottleneck ResNet [2, 2, 2, 1] (a single-block layer4 is the case where ml-fct's
  embedding block is also the layer's first), width 2, embedding 8, 20 classes, torchvision's classifier (Linear
  with bias); ``torch.save`` of its state dict.
* ``torch_side_tiny.npz``: a ResNet like the first with embedding 4 and 3 classes, its wrapper's state dict as
  ``.npz`` (names ``model.*``), standing for a SimCLR ψ whose classifier the import leaves out.
* ``torch_fct_mlp_tiny.pt``: the FCT transformation MLP (old 8, side 4, new 8, inner 16), TorchScript.
* ``torch_fixtures_io.npz``: fixed inputs and the models' eval-mode outputs.
* ``torch_misc.pt``: ``torch.save`` of a dict with a Parameter, float16 and bfloat16 tensors, a transposed (strided)
  tensor in a nested dict, and a plain number.

The widths and classes fit the demo's ``runlocal`` data (old split 4 classes, new split 20) and the evaluation's
new/old comparison (φ_old and φ_new both 8-d), so the tests can run an experiment on the imported stages.
BatchNorm statistics and affine parameters are randomised so that eval mode is not the identity.
"""

import os

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


class Residual(nn.Module):
  """What both blocks share: a 1×1 conv + BN shortcut when the shape changes, the sum, the optional ReLU."""

  def shortcut(self, cin, out_dim, stride, nonlin):
    self.downsample = None
    if stride != 1 or cin != out_dim:
      self.downsample = nn.Sequential(nn.Conv2d(cin, out_dim, 1, stride, bias=False), nn.BatchNorm2d(out_dim))
    self.nonlin = nonlin

  def join(self, x, y):
    y = y + (x if self.downsample is None else self.downsample(x))
    return torch.relu(y) if self.nonlin else y


class Basic(Residual):
  expansion = 1

  def __init__(self, cin, planes, stride, out_dim, nonlin=True):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, out_dim, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_dim)
    self.conv2 = nn.Conv2d(out_dim, out_dim, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_dim)
    self.shortcut(cin, out_dim, stride, nonlin)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return self.join(x, y)


class Bottle(Residual):
  expansion = 4

  def __init__(self, cin, planes, stride, out_dim, nonlin=True):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_dim, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_dim)
    self.shortcut(cin, out_dim, stride, nonlin)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.join(x, y)


class ResNet(nn.Module):
  """Embedding built into layer4's last block (its output width), ReLU, average pool; classifier on top."""

  def __init__(self, block, layers, width, embedding_dim, num_classes, linear_fc):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = width
    for i, n in enumerate(layers):
      planes = width * 2 ** i
      blocks = []
      for j in range(n):
        last = i == len(layers) - 1 and j == n - 1
        out_dim = embedding_dim if last else planes * block.expansion
        blocks.append(block(cin, planes, 2 if i > 0 and j == 0 else 1, out_dim))
        cin = out_dim
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.linear_fc = linear_fc
    self.fc = nn.Linear(embedding_dim, num_classes) if linear_fc else nn.Conv2d(embedding_dim, num_classes, 1,
                                                                                 bias=False)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    feature = x.mean(dim=(2, 3), keepdim=True)
    logits = self.fc(feature.flatten(1)) if self.linear_fc else self.fc(feature).flatten(1)
    return logits, feature


class Wrapper(nn.Module):
  """Like ml-fct's FeatureExtractor: the network under ``model``, returning the feature only."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, x):
    return self.model(x)[1]


class Block(nn.Module):
  def __init__(self, cin, cout, last=False):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 1, bias=last)
    self.normalizer = None if last else nn.BatchNorm2d(cout)

  def forward(self, x):
    x = self.conv(x)
    if self.normalizer is not None:
      x = torch.relu(self.normalizer(x))
    return x


class FCTMLP(nn.Module):
  def __init__(self, old, new, side, inner):
    super().__init__()
    self.p1 = nn.Sequential(Block(old, 2 * old), Block(2 * old, 2 * new))
    self.p2 = nn.Sequential(Block(side, 2 * side), Block(2 * side, 2 * new))
    self.mixer = nn.Sequential(Block(4 * new, inner), Block(inner, inner), Block(inner, new, last=True))

  def forward(self, old, side):
    return self.mixer(torch.cat([self.p1(old), self.p2(side)], dim=1))


def randomise_bn(model):
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 1.5)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  return model.eval()


def main():
  torch.manual_seed(0)
  io = {"image": torch.randn(2, 3, 32, 32)}
  r18 = randomise_bn(ResNet(Basic, [2, 2, 2, 2], 2, 8, 4, linear_fc=False))
  r50 = randomise_bn(ResNet(Bottle, [2, 2, 2, 1], 2, 8, 20, linear_fc=True))
  side = randomise_bn(ResNet(Basic, [2, 2, 2, 2], 2, 4, 3, linear_fc=False))
  mlp = randomise_bn(FCTMLP(8, 8, 4, 16))
  io["old"], io["side"] = torch.randn(3, 8, 1, 1), torch.randn(3, 4, 1, 1)
  with torch.no_grad():
    io["resnet18_logits"], io["resnet18_feature"] = r18(io["image"])
    io["resnet50_logits"], io["resnet50_feature"] = r50(io["image"])
    _, io["side_feature"] = side(io["image"])
    io["fct_mlp_out"] = mlp(io["old"], io["side"])
  torch.jit.save(torch.jit.script(Wrapper(r18)), os.path.join(HERE, "torch_resnet18_tiny.pt"))
  torch.save(r50.state_dict(), os.path.join(HERE, "torch_resnet50_tiny.pth"))
  side_state = {k: v.numpy() for k, v in Wrapper(side).state_dict().items()}
  np.savez_compressed(os.path.join(HERE, "torch_side_tiny.npz"), **side_state)
  torch.jit.save(torch.jit.script(mlp), os.path.join(HERE, "torch_fct_mlp_tiny.pt"))
  np.savez_compressed(os.path.join(HERE, "torch_fixtures_io.npz"), **{k: v.numpy() for k, v in io.items()})
  six = torch.arange(6.0).reshape(2, 3)
  torch.save({"w": nn.Parameter(six), "half": torch.arange(4, dtype=torch.float16),
              "bf16": torch.arange(3, dtype=torch.bfloat16), "nested": {"t": six.t()}, "epoch": 3},
             os.path.join(HERE, "torch_misc.pt"))

if __name__ == "__main__":
  main()
