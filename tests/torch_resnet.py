"""A PyTorch ResNet in torchvision's layout and state-dict names, written out here: the reference
that our ResNet and its weight import are compared with (skips without torch)."""

import pytest

STAGES = ("C2", "C3", "C4", "C5")


def torch_resnet(depth: int, num_classes: int):
    torch = pytest.importorskip("torch")
    tnn = torch.nn

    class BasicBlock(tnn.Module):
        expansion = 1

        def __init__(self, in_features, features, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(in_features, features, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(features)
            self.conv2 = tnn.Conv2d(features, features, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(features)
            self.relu = tnn.ReLU()
            self.downsample = None
            if stride != 1 or in_features != features:
                self.downsample = tnn.Sequential(
                    tnn.Conv2d(in_features, features, 1, stride, bias=False),
                    tnn.BatchNorm2d(features),
                )

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x if self.downsample is None else self.downsample(x)
            return self.relu(out + shortcut)

    class Bottleneck(tnn.Module):
        expansion = 4

        def __init__(self, in_features, features, stride):
            super().__init__()
            out_features = features * 4
            self.conv1 = tnn.Conv2d(in_features, features, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(features)
            self.conv2 = tnn.Conv2d(features, features, 3, stride, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(features)
            self.conv3 = tnn.Conv2d(features, out_features, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(out_features)
            self.relu = tnn.ReLU()
            self.downsample = None
            if stride != 1 or in_features != out_features:
                self.downsample = tnn.Sequential(
                    tnn.Conv2d(in_features, out_features, 1, stride, bias=False),
                    tnn.BatchNorm2d(out_features),
                )

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            shortcut = x if self.downsample is None else self.downsample(x)
            return self.relu(out + shortcut)

    block, stage_sizes = {18: (BasicBlock, (2, 2, 2, 2)), 50: (Bottleneck, (3, 4, 6, 3))}[depth]

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = tnn.BatchNorm2d(64)
            self.relu = tnn.ReLU()
            self.maxpool = tnn.MaxPool2d(3, 2, 1)
            in_features = 64
            for stage, num_blocks in enumerate(stage_sizes):
                features = 64 * 2**stage
                blocks = []
                for index in range(num_blocks):
                    stride = 2 if stage > 0 and index == 0 else 1
                    blocks.append(block(in_features, features, stride))
                    in_features = features * block.expansion
                setattr(self, f"layer{stage + 1}", tnn.Sequential(*blocks))
            self.fc = tnn.Linear(in_features, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            stages = {}
            for stage, name in enumerate(STAGES):
                x = getattr(self, f"layer{stage + 1}")(x)
                stages[name] = x
            stages["logits"] = self.fc(x.mean(dim=(2, 3)))
            return stages

    torch.manual_seed(depth)
    model = ResNet()
    generator = torch.Generator().manual_seed(depth + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, tnn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(0.5 + torch.rand(channels, generator=generator))
                module.bias.copy_(0.2 * torch.randn(channels, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
                module.num_batches_tracked.fill_(7)
    return model.eval()
