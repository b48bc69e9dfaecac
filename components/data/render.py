"""Vectorized ray casting of `Scenes` into RGB and every annotation, from one geometry pass.

All annotations come from the same hit points, normals and object ids, so the tasks are
related the way real ones are (design.md section 2): depth, mist, normals, reshading and
curvature share geometry; texture edges and 2D keypoints come from the RGB image alone.
Arrays are float32, component-wise (x, y, z as separate (N, P) arrays) for numpy speed;
P = size * size pixels.
"""

from __future__ import annotations

import numpy as np

from components.data.scenes import ROOM_MATERIALS, Pattern, Scenes, Shape

INF = np.float32(np.inf)
EPS = np.float32(1e-4)
# Canonical light for reshading, in the camera frame (x right, y up, z forward): from above-left,
# behind the camera. Reshading = max(0, normal_cam . CANONICAL_LIGHT).
CANONICAL_LIGHT = np.array([-0.4, 0.6, -0.7], np.float32) / np.linalg.norm([-0.4, 0.6, -0.7])
OCCLUSION_JUMP = 0.06  # relative depth jump between neighbouring pixels that counts as an occlusion
AMBIENT = 0.25

# Semantic classes (components.tasks.SEMANTIC_CLASSES): floor, wall, ceiling, then shapes.
FLOOR, WALL, CEILING = 0, 1, 2
SHAPE_CLASS_OFFSET = 3


def camera_rays(size: int, fov_deg: float) -> np.ndarray:
    """Unit ray directions in the camera frame, (3, P), row-major pixels, row 0 at the top."""
    half = np.tan(np.deg2rad(fov_deg) / 2)
    coords = ((np.arange(size) + 0.5) / size * 2 - 1) * half
    u, v = np.meshgrid(coords, -coords)
    d = np.stack([u.ravel(), v.ravel(), np.ones(size * size)])
    return (d / np.linalg.norm(d, axis=0)).astype(np.float32)


def render(scenes: Scenes, size: int, fov_deg: float) -> dict[str, np.ndarray]:
    """Render a batch: returns shard columns, each (N, ...) in its stored dtype."""
    n, slots = scenes.shape.shape
    cam_dirs = camera_rays(size, fov_deg)
    rot = scenes.cam_rot
    d = [
        rot[:, i, 0, None] * cam_dirs[0] + rot[:, i, 1, None] * cam_dirs[1] + rot[:, i, 2, None] * cam_dirs[2]
        for i in range(3)
    ]
    o = [scenes.cam_pos[:, i, None] for i in range(3)]

    t_room, room_axis = _intersect_room(o, d, scenes.room)
    t_obj = np.full((n, slots, size * size), INF, np.float32)
    for shape, fn in ((Shape.SPHERE, _t_sphere), (Shape.BOX, _t_box), (Shape.CYLINDER, _t_cylinder)):
        img, slot = np.nonzero(scenes.shape == shape)
        if len(img):
            oo = [c[img] for c in o]
            dd = [c[img] for c in d]
            t_obj[img, slot] = fn(
                oo, dd, scenes.center[img, slot], scenes.extent[img, slot], scenes.angle[img, slot]
            )
    slot_win = t_obj.argmin(1)
    t_win = np.take_along_axis(t_obj, slot_win[:, None], 1)[:, 0]
    on_obj = t_win < t_room
    t = np.where(on_obj, t_win, t_room)
    p = [o[i] + t * d[i] for i in range(3)]

    normal, instance, material, semantic, curvature = _surfaces(scenes, d, p, room_axis, on_obj, slot_win)
    normal_cam = [sum(rot[:, j, i, None] * normal[j] for j in range(3)) for i in range(3)]
    albedo = _albedo(scenes, p, material)
    rgb = _shade(scenes, p, normal, albedo)
    z_depth = t * cam_dirs[2]
    reshading = np.maximum(0.0, sum(CANONICAL_LIGHT[i] * normal_cam[i] for i in range(3)))

    def img(x: np.ndarray, dtype: type = np.float16) -> np.ndarray:
        return x.reshape(n, -1, size, size).astype(dtype)

    rgb_img = img(np.stack(rgb, 1), np.float32)
    gray = 0.299 * rgb_img[:, 0] + 0.587 * rgb_img[:, 1] + 0.114 * rgb_img[:, 2]
    surface_id = instance * 8 + np.where(on_obj, 0, room_axis + 1)
    presence = np.zeros((n, 3), np.float32)
    for k in range(3):
        presence[:, k] = (semantic == SHAPE_CLASS_OFFSET + k).any(1)
    return {
        "rgb": np.clip(np.rint(rgb_img * 255), 0, 255).astype(np.uint8),
        "depth_zbuffer": img(z_depth),
        "depth_euclidean": img(t),
        "normal": img(np.stack(normal_cam, 1)),
        "reshading": img(reshading),
        "curvature": img(np.stack(curvature, 1)),
        "edge_texture": img(_sobel_magnitude(gray)),
        "edge_occlusion": img(_occlusion_edges(t.reshape(n, size, size), surface_id.reshape(n, size, size))),
        "keypoints2d": img(_harris(gray)),
        "keypoints3d": img(_keypoints3d(scenes, t, cam_dirs, size, fov_deg)),
        "segment_semantic": semantic.reshape(n, size, size).astype(np.uint8),
        "instance": instance.reshape(n, size, size).astype(np.uint8),
        "class_object": presence,
        "room_layout": _room_layout(scenes),
    }


def _intersect_room(o: list, d: list, room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance of rays from inside the room box, and the axis of the face they hit."""
    lo = [-room[:, 0] / 2, np.zeros(len(room), np.float32), -room[:, 2] / 2]
    hi = [room[:, 0] / 2, room[:, 1], room[:, 2] / 2]
    ts = []
    for i in range(3):
        bound = np.where(d[i] > 0, hi[i][:, None], lo[i][:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            ti = (bound - o[i]) / d[i]
        ts.append(np.where(np.abs(d[i]) > 1e-9, ti, INF))
    ts = np.stack(ts)
    axis = ts.argmin(0)
    return np.take_along_axis(ts, axis[None], 0)[0], axis


def _rotate_y(
    x: np.ndarray, z: np.ndarray, cos: np.ndarray, sin: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return cos * x + sin * z, -sin * x + cos * z


def _t_sphere(o: list, d: list, center: np.ndarray, extent: np.ndarray, angle: np.ndarray) -> np.ndarray:
    r = extent[:, 0, None]
    oc = [o[i] - center[:, i, None] for i in range(3)]
    b = oc[0] * d[0] + oc[1] * d[1] + oc[2] * d[2]
    c = oc[0] ** 2 + oc[1] ** 2 + oc[2] ** 2 - r**2
    disc = b * b - c
    t = -b - np.sqrt(np.maximum(disc, 0))
    return np.where((disc > 0) & (t > EPS), t, INF)


def _t_box(o: list, d: list, center: np.ndarray, extent: np.ndarray, angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    ox, oz = _rotate_y(o[0] - center[:, 0, None], o[2] - center[:, 2, None], cos, sin)
    dx, dz = _rotate_y(d[0], d[2], cos, sin)
    oy, dy = o[1] - center[:, 1, None], d[1]
    t_near = np.full(dx.shape, -INF, np.float32)
    t_far = np.full(dx.shape, INF, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        for oi, di, h in (
            (ox, dx, extent[:, 0, None]),
            (oy, dy, extent[:, 1, None]),
            (oz, dz, extent[:, 2, None]),
        ):
            inv = 1.0 / di
            t1, t2 = (-h - oi) * inv, (h - oi) * inv
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
    return np.where((t_far >= t_near) & (t_near > EPS), t_near, INF)


def _t_cylinder(o: list, d: list, center: np.ndarray, extent: np.ndarray, angle: np.ndarray) -> np.ndarray:
    r, height = extent[:, 0, None], extent[:, 1, None]
    ox, oy, oz = o[0] - center[:, 0, None], o[1] - center[:, 1, None], o[2] - center[:, 2, None]
    a = d[0] ** 2 + d[2] ** 2
    b = ox * d[0] + oz * d[2]
    c = ox**2 + oz**2 - r**2
    disc = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
        y_side = oy + t_side * d[1]
        side_ok = (disc > 0) & (t_side > EPS) & (y_side >= 0) & (y_side <= height)
        t_cap = (height - oy) / d[1]
    cap_ok = (t_cap > EPS) & ((ox + t_cap * d[0]) ** 2 + (oz + t_cap * d[2]) ** 2 <= r**2)
    return np.minimum(np.where(side_ok, t_side, INF), np.where(cap_ok, t_cap, INF))


def _surfaces(
    scenes: Scenes, d: list, p: list, room_axis: np.ndarray, on_obj: np.ndarray, slot_win: np.ndarray
):
    """World normals, instance ids, material index, semantic class and curvature of every pixel."""
    shape_px = np.take_along_axis(scenes.shape, slot_win, 1)
    # Room: the face's inward normal; floor/ceiling by the ray's vertical direction.
    normal = [np.where(room_axis == i, -np.sign(d[i]), 0).astype(np.float32) for i in range(3)]
    is_floor_or_ceiling = room_axis == 1
    semantic = np.where(is_floor_or_ceiling, np.where(d[1] < 0, FLOOR, CEILING), WALL)
    material = semantic.copy()  # room materials 0, 1, 2 are floor, walls, ceiling
    instance = np.where(on_obj, slot_win + 1, 0)
    semantic = np.where(on_obj, SHAPE_CLASS_OFFSET + shape_px, semantic)
    material = np.where(on_obj, ROOM_MATERIALS + slot_win, material)
    k1 = np.zeros_like(p[0])
    k2 = np.zeros_like(p[0])
    for shape in (Shape.SPHERE, Shape.BOX, Shape.CYLINDER):
        img, px = np.nonzero(on_obj & (shape_px == shape))
        if not len(img):
            continue
        slot = slot_win[img, px]
        c, e, a = scenes.center[img, slot], scenes.extent[img, slot], scenes.angle[img, slot]
        q = [p[i][img, px] - c[:, i] for i in range(3)]
        if shape is Shape.SPHERE:
            n = [qi / e[:, 0] for qi in q]
            k1[img, px] = k2[img, px] = 1.0 / e[:, 0]
        elif shape is Shape.BOX:
            cos, sin = np.cos(a), np.sin(a)
            lx, lz = _rotate_y(q[0], q[2], cos, sin)
            local = np.stack([lx, q[1], lz]) / e.T
            face = np.abs(local).argmax(0)
            sign = np.sign(np.take_along_axis(local, face[None], 0)[0])
            nl = [np.where(face == i, sign, 0) for i in range(3)]
            nx, nz = _rotate_y(nl[0], nl[2], cos, -sin)  # back to world: rotate by -angle
            n = [nx, nl[1], nz]
        else:
            on_cap = q[1] >= e[:, 1] - 1e-3
            n = [
                np.where(on_cap, 0, q[0] / e[:, 0]),
                np.where(on_cap, 1, 0),
                np.where(on_cap, 0, q[2] / e[:, 0]),
            ]
            k1[img, px] = np.where(on_cap, 0, 1.0 / e[:, 0])
        length = np.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2)
        for i in range(3):
            normal[i][img, px] = n[i] / length
    return normal, instance, material, semantic, [k1, k2]


def _albedo(scenes: Scenes, p: list, material: np.ndarray) -> list:
    """Solid procedural textures (plain, checker, stripes) evaluated at each hit point."""

    def per_pixel(table: np.ndarray) -> np.ndarray:
        return np.take_along_axis(table, material, 1)

    # Object textures live in object coordinates so they move with the object.
    centers = np.concatenate([np.zeros((len(scenes), ROOM_MATERIALS, 3), np.float32), scenes.center], 1)
    q = [p[i] - per_pixel(centers[..., i]) for i in range(3)]
    freq = per_pixel(scenes.frequency)
    pattern = per_pixel(scenes.pattern)
    checker = (np.floor(freq * q[0]) + np.floor(freq * q[1]) + np.floor(freq * q[2])) % 2
    along = sum(per_pixel(scenes.stripe_dir[..., i]) * q[i] for i in range(3))
    stripes = np.floor(freq * along) % 2
    use_b = (
        np.where(pattern == Pattern.CHECKER, checker, np.where(pattern == Pattern.STRIPES, stripes, 0)) > 0
    )
    return [
        np.where(use_b, per_pixel(scenes.color_b[..., i]), per_pixel(scenes.color_a[..., i]))
        for i in range(3)
    ]


def _shade(scenes: Scenes, p: list, normal: list, albedo: list) -> list:
    to_light = [scenes.light_pos[:, i, None] - p[i] for i in range(3)]
    dist2 = to_light[0] ** 2 + to_light[1] ** 2 + to_light[2] ** 2
    cos = (to_light[0] * normal[0] + to_light[1] * normal[1] + to_light[2] * normal[2]) / np.sqrt(dist2)
    light = AMBIENT + (1 - AMBIENT) * np.maximum(cos, 0) * 1.8 / (1.0 + 0.1 * dist2)
    return [np.clip(albedo[i] * light * scenes.light_color[:, i, None], 0, 1) for i in range(3)]


def _shifted(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x shifted by (dy, dx) with edge replication; x is (N, H, W)."""
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[1:]
    return pad[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _sobel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = {(dy, dx): _shifted(x, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    gx = (s[-1, 1] + 2 * s[0, 1] + s[1, 1]) - (s[-1, -1] + 2 * s[0, -1] + s[1, -1])
    gy = (s[1, -1] + 2 * s[1, 0] + s[1, 1]) - (s[-1, -1] + 2 * s[-1, 0] + s[-1, 1])
    return gx / 8, gy / 8


def _box3(x: np.ndarray) -> np.ndarray:
    return sum(_shifted(x, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9


def _sobel_magnitude(gray: np.ndarray) -> np.ndarray:
    """Texture edges: gradient magnitude of the luminance, (N, H, W) in about [0, 1]."""
    gx, gy = _sobel(gray)
    return np.minimum(4 * np.sqrt(gx * gx + gy * gy), 1.0)


def _harris(gray: np.ndarray) -> np.ndarray:
    """2D keypoints: Harris corner response of the luminance, squashed into [0, 1)."""
    gx, gy = _sobel(gray)
    sxx, syy, sxy = _box3(gx * gx), _box3(gy * gy), _box3(gx * gy)
    response = sxx * syy - sxy * sxy - 0.05 * (sxx + syy) ** 2
    return np.tanh(np.maximum(response, 0) * 2e3)


def _occlusion_edges(depth: np.ndarray, surface_id: np.ndarray) -> np.ndarray:
    """1 where a 4-neighbour on another surface is farther by more than OCCLUSION_JUMP (relative)."""
    edge = np.zeros(depth.shape, bool)
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        other_d, other_s = _shifted(depth, dy, dx), _shifted(surface_id, dy, dx)
        edge |= (other_s != surface_id) & (other_d - depth > OCCLUSION_JUMP * depth)
    return edge.astype(np.float32)


def _keypoints3d(
    scenes: Scenes, t: np.ndarray, cam_dirs: np.ndarray, size: int, fov_deg: float
) -> np.ndarray:
    """3D keypoints: Gaussian blobs at the visible corners of the room and of the boxes, and the
    rim centres of cylinders and tops of spheres (geometric interest points, as NARF on 3D)."""
    points = _corner_points(scenes)  # (N, K, 3), NaN where absent
    rel = points - scenes.cam_pos[:, None]
    cam = np.einsum("nkj,nji->nki", rel, scenes.cam_rot)  # world -> camera frame
    half = np.tan(np.deg2rad(fov_deg) / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        col = (cam[..., 0] / cam[..., 2] / half + 1) / 2 * size - 0.5
        row = (1 - cam[..., 1] / cam[..., 2] / half) / 2 * size - 0.5
    dist = np.linalg.norm(rel, axis=-1)
    inside = (cam[..., 2] > 0.05) & (col > -0.5) & (col < size - 0.5) & (row > -0.5) & (row < size - 0.5)
    ci = np.clip(np.rint(np.nan_to_num(col)), 0, size - 1).astype(int)
    ri = np.clip(np.rint(np.nan_to_num(row)), 0, size - 1).astype(int)
    visible_dist = np.take_along_axis(t, ri * size + ci, 1)
    visible = inside & (dist <= visible_dist * 1.03 + 0.02)
    sigma = max(size / 48, 0.75)
    grid = np.arange(size, dtype=np.float32)
    gy = np.exp(-((grid - np.nan_to_num(row)[..., None]) ** 2) / (2 * sigma**2)) * visible[..., None]
    gx = np.exp(-((grid - np.nan_to_num(col)[..., None]) ** 2) / (2 * sigma**2))
    return np.minimum(np.einsum("nky,nkx->nyx", gy.astype(np.float32), gx.astype(np.float32)), 1.0)


def _corner_points(scenes: Scenes) -> np.ndarray:
    n = len(scenes)
    w, h, d = scenes.room[:, 0] / 2, scenes.room[:, 1], scenes.room[:, 2] / 2
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (0, 1) for sz in (-1, 1)], np.float32)
    room = np.stack([signs[:, 0] * w[:, None], signs[:, 1] * h[:, None], signs[:, 2] * d[:, None]], -1)
    box_signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], np.float32)
    e, c, a = scenes.extent, scenes.center, scenes.angle
    lx, ly, lz = (
        box_signs[:, 0] * e[..., 0, None],
        box_signs[:, 1] * e[..., 1, None],
        box_signs[:, 2] * e[..., 2, None],
    )
    wx, wz = _rotate_y(lx, lz, np.cos(a)[..., None], -np.sin(a)[..., None])
    corners = np.stack([wx, ly, wz], -1) + c[:, :, None]  # (N, S, 8, 3)
    # Spheres: the top point; cylinders: the top-cap centre. Stored in corner slot 0.
    top = c + np.stack([np.zeros_like(e[..., 0]), e[..., 1], np.zeros_like(e[..., 0])], -1)
    round_pts = np.full_like(corners, np.nan)
    round_pts[:, :, 0] = top
    shape = scenes.shape[..., None, None]
    obj = np.where(shape == Shape.BOX, corners, np.where(shape >= 0, round_pts, np.nan))
    return np.concatenate([room, obj.reshape(n, -1, 3)], 1).astype(np.float32)


def _room_layout(scenes: Scenes) -> np.ndarray:
    """Camera pose in the room and the room's size, each scaled to about unit range."""
    w, h, d = scenes.room.T
    x, y, z = scenes.cam_pos.T
    return np.stack(
        [
            x / (w / 2),
            y / h,
            z / (d / 2),
            np.sin(scenes.yaw),
            np.cos(scenes.yaw),
            scenes.pitch / 0.5,
            w / 5,
            h / 3,
            d / 5,
        ],
        1,
    ).astype(np.float32)
