"""The set-up itself: torchvision works on this CPU torch, and the layering rule holds."""

import ast
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_torchvision_imports_and_runs_a_resnet_on_cpu():
    import torchvision
    from torchvision.ops import nms

    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]  # a compiled torchvision op, not just the Python layer


def forbidden(path: Path) -> set[str]:
    """Components never import pipelines; only the thin tracking module may import MLflow."""
    allowed = {"mlflow"} if path.name == "tracking.py" else set()
    return {"pipelines", "cluster", "ray", "mlflow"} - allowed


def test_components_never_import_pipelines_ray_or_mlflow():
    offenders = []
    for path in (ROOT / "components").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in forbidden(path)]
    assert offenders == []
