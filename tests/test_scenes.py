"""The synthetic scenes: deterministic, and every annotation agrees with the shared geometry."""

import numpy as np
import pytest

from components.data import render as R
from components.data.scenes import OBJECT_CLASSES, SEMANTIC_CLASSES, SceneConfig, Shape, sample_scenes
from components.data.synthetic import DatasetConfig, render_images, synthetic_columns
from components.errors import ConfigError

pytestmark = pytest.mark.numerics  # CI runs these again under another CPU kernel path

SIZE = 64
CONFIG = DatasetConfig(seed=3, scene=SceneConfig(size=SIZE))


@pytest.fixture(scope="module")
def batch():
    out = render_images(CONFIG, "train", 0, 24)
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in out.items()}


def camera_points(z: np.ndarray, size: int, fov_deg: float) -> np.ndarray:
    """(N, H, W) z-depth -> (N, H, W, 3) camera-frame points."""
    half = np.tan(np.deg2rad(fov_deg) / 2)
    c = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    u, v = np.meshgrid(c, -c)
    return np.stack([u * z, v * z, z], -1)


def test_image_depends_only_on_seed_and_index():
    whole = render_images(CONFIG, "test", 0, 10)
    part = render_images(CONFIG, "test", 4, 3)
    for k in whole:
        np.testing.assert_array_equal(whole[k][4:7], part[k])
    other = render_images(DatasetConfig(seed=4, scene=CONFIG.scene), "test", 4, 3)
    assert not np.array_equal(other["rgb"], part["rgb"])


@pytest.mark.parametrize("size", [32, 64, 128])
def test_every_column_has_its_declared_shape_and_dtype(size):
    config = DatasetConfig(seed=1, scene=SceneConfig(size=size))
    out = render_images(config, "train", 0, 3)
    for spec in synthetic_columns(size):
        assert out[spec.name].shape == (3, *spec.shape), spec.name
        assert out[spec.name].dtype == np.dtype(spec.dtype), spec.name
        assert np.isfinite(out[spec.name].astype(np.float32)).all(), spec.name


def test_normals_match_the_gradient_of_depth_on_planes(batch):
    pts = camera_points(batch["depth_zbuffer"][:, 0], SIZE, CONFIG.scene.fov_deg)
    normal = batch["normal"].transpose(0, 2, 3, 1)
    # Central differences two pixels apart, where the 5x5 neighbourhood is one planar surface.
    du = pts[:, 2:-2, 4:] - pts[:, 2:-2, :-4]
    dv = pts[:, 4:, 2:-2] - pts[:, :-4, 2:-2]
    n_depth = np.cross(du, dv)
    n_depth /= np.linalg.norm(n_depth, axis=-1, keepdims=True)
    centre = normal[:, 2:-2, 2:-2]
    inst = batch["instance"]
    planar = np.ones(centre.shape[:3], bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            nb = normal[:, 2 + dy : SIZE - 2 + dy, 2 + dx : SIZE - 2 + dx]
            same_inst = inst[:, 2 + dy : SIZE - 2 + dy, 2 + dx : SIZE - 2 + dx] == inst[:, 2:-2, 2:-2]
            planar &= same_inst & (np.abs(nb - centre).max(-1) < 1e-2)
    planar &= np.isin(batch["segment_semantic"][:, 2:-2, 2:-2], [0, 1, 2, 4])  # floor, wall, ceiling, box
    assert planar.sum() > 10_000
    cos = np.abs((n_depth * centre).sum(-1))[planar]
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(angle) < 2.0
    assert np.percentile(angle, 95) < 8.0
    # Stored normals face the camera.
    view = pts / np.linalg.norm(pts, axis=-1, keepdims=True)
    assert ((view * normal).sum(-1) < 1e-3).mean() > 0.999


def test_reshading_is_the_normals_under_the_canonical_light(batch):
    expected = np.maximum(0, np.einsum("nchw,c->nhw", batch["normal"], R.CANONICAL_LIGHT))
    np.testing.assert_allclose(batch["reshading"][:, 0], expected, atol=4e-3)


def test_euclidean_depth_is_z_depth_over_the_ray_cosine(batch):
    z, dist = batch["depth_zbuffer"][:, 0], batch["depth_euclidean"][:, 0]
    assert (dist >= z * (1 - 1e-3)).all()
    cos = R.camera_rays(SIZE, CONFIG.scene.fov_deg)[2].reshape(SIZE, SIZE)
    np.testing.assert_allclose(z, dist * cos, rtol=2e-3)
    assert (dist > z * 1.05).any()  # off-axis pixels really are farther than their z


def test_occlusion_edges_only_where_depth_jumps(batch):
    depth, edges = batch["depth_euclidean"][:, 0], batch["edge_occlusion"][:, 0] > 0.5
    jump = np.zeros_like(depth)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        jump = np.maximum(jump, R._shifted(depth, dy, dx) - depth)
    rel = jump / depth
    assert edges.sum() > 100
    assert (rel[edges] > R.OCCLUSION_JUMP * 0.95).all()
    # Every big jump between two different objects is marked.
    inst = batch["instance"].astype(int)
    other = np.zeros_like(edges)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        other |= (R._shifted(inst, dy, dx) != inst) & (R._shifted(depth, dy, dx) - depth > 0.2 * depth)
    assert edges[other].all()


def test_semantic_labels_agree_with_object_masks(batch):
    sem, inst = batch["segment_semantic"], batch["instance"]
    assert np.isin(sem[inst == 0], [0, 1, 2]).all()
    assert (sem[inst > 0] >= 3).all()
    for n in range(len(sem)):
        for k in np.unique(inst[n][inst[n] > 0]):
            assert len(np.unique(sem[n][inst[n] == k])) == 1  # one object, one class
        present = {SEMANTIC_CLASSES[c] for c in np.unique(sem[n])}
        expected = [float(c in present) for c in OBJECT_CLASSES]
        np.testing.assert_array_equal(batch["class_object"][n], expected)


def test_curvature_is_zero_on_planes_and_one_over_radius_on_spheres():
    config = DatasetConfig(seed=5, scene=SceneConfig(size=SIZE))
    scenes = sample_scenes((config.seed, 0), 0, 16, config.scene)
    out = R.render(scenes, SIZE, config.scene.fov_deg)
    curv, inst, sem = out["curvature"].astype(np.float32), out["instance"], out["segment_semantic"]
    planar = np.isin(sem, [0, 1, 2, 4])
    assert (curv[:, 0][planar] == 0).all() and (curv[:, 1][planar] == 0).all()
    checked = 0
    for n, s in zip(*np.nonzero(scenes.shape == Shape.SPHERE), strict=True):
        mask = inst[n] == s + 1
        if mask.any():
            np.testing.assert_allclose(curv[n, :, mask], 1 / scenes.extent[n, s, 0], rtol=2e-3)
            checked += 1
    assert checked > 0


def test_bad_scene_settings_name_the_field():
    with pytest.raises(ConfigError, match="size"):
        SceneConfig(size=4)
    with pytest.raises(ConfigError, match="min_objects"):
        SceneConfig(min_objects=3, max_objects=2)
    with pytest.raises(ConfigError, match="n_test"):
        DatasetConfig(n_test=-1)
