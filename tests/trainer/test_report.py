"""Sample grids: small frames enlarged in one row, real-size videos averaged down into a grid."""

import torch

from kvpo.run.report import preview, save_videos, video_grid


def _u8(x: torch.Tensor) -> torch.Tensor:
    return ((x.double().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_small_frames_side_by_side_enlarged():
    videos = torch.rand(3, 2, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    grid = video_grid(videos)
    assert grid.shape == (2, 96, 3 * 25 * 4, 3) and grid.dtype == torch.uint8
    for b in range(3):  # video b's frame, 4x4 pixel blocks, then a white separator column
        tile = grid[:, :, b * 100 : b * 100 + 96].permute(0, 3, 1, 2)
        want = _u8(videos[b]).repeat_interleave(4, 2).repeat_interleave(4, 3)
        assert torch.equal(tile, want)
        assert (grid[:, :, b * 100 + 96 : b * 100 + 100] == 255).all()


def test_real_size_videos_averaged_down_into_a_grid():
    """16 videos of 480x832 (Wan2.1's size): 2x2 averages, 4 x 4 tiles, 1.7k pixels wide."""
    videos = torch.rand(16, 2, 3, 480, 832, generator=torch.Generator().manual_seed(1)) * 2 - 1
    grid = video_grid(videos)
    assert grid.shape == (2, 4 * 241, 4 * 417, 3)
    pooled = videos.double().view(16, 2, 3, 240, 2, 416, 2).mean((4, 6))
    for b in (0, 5, 15):
        r, c = divmod(b, 4)
        tile = grid[:, r * 241 : r * 241 + 240, c * 417 : c * 417 + 416].permute(0, 3, 1, 2)
        assert (tile.int() - _u8(pooled[b]).int()).abs().max() <= 1  # float32 vs float64 rounding
    assert (grid[:, 240] == 255).all() and (grid[:, :, 416] == 255).all()


def test_preview_is_what_the_grid_draws():
    """What evaluation keeps of real videos: 3x3 averages of 600-pixel frames, clamped; frames of
    at most 256 pixels as they are. The grid of a preview is the grid of the videos."""
    videos = torch.randn(2, 2, 3, 600, 90, generator=torch.Generator().manual_seed(3))
    small = preview(videos)
    assert small.shape == (2, 2, 3, 200, 30) and small.dtype == torch.float32
    want = videos.double().clamp(-1, 1).view(2, 2, 3, 200, 3, 30, 3).mean((4, 6))
    torch.testing.assert_close(small.double(), want, rtol=0, atol=1e-6)
    assert torch.equal(video_grid(small), video_grid(videos))
    assert torch.equal(preview(small), small)
    tiny = torch.randn(1, 2, 3, 24, 24, dtype=torch.float64)
    assert torch.equal(preview(tiny), tiny.float().clamp(-1, 1))


def test_a_partial_last_row_is_white_and_files_are_written(tmp_path):
    videos = torch.rand(5, 3, 3, 300, 900, generator=torch.Generator().manual_seed(2)) * 2 - 1
    grid = video_grid(videos)  # 2x down: 150x450; 5 x 451 > 2048 -> 3 columns, 2 rows
    assert grid.shape == (3, 2 * 151, 3 * 451, 3)
    assert (grid[:, 151:, 2 * 451 :] == 255).all()  # the sixth tile
    written = save_videos(videos, tmp_path / "sub" / "grid", mp4=False)
    assert written == [tmp_path / "sub" / "grid.gif"] and written[0].stat().st_size > 0


def test_source_revision_is_the_checkouts_commit(tmp_path):
    import subprocess
    from pathlib import Path

    from kvpo.run.report import source_revision

    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if head:  # a git checkout, as CI's clean clone is
        assert source_revision().split("+")[0] == head
    assert source_revision(tmp_path) is None  # not a checkout
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "site-packages").mkdir()
    assert source_revision(tmp_path / "site-packages") is None  # inside another repository


def test_a_grid_of_odd_size_still_makes_an_mp4(tmp_path):
    """libx264 refuses an odd height or width: the grid is padded, the mp4 is written whole and
    holds every frame."""
    import imageio.v3 as iio

    videos = torch.rand(3, 4, 3, 25, 31, generator=torch.Generator().manual_seed(3)) * 2 - 1
    grid = video_grid(videos)
    assert grid.shape[1] % 2 or grid.shape[2] % 2  # an odd grid indeed
    written = save_videos(videos, tmp_path / "odd")
    assert written == [tmp_path / "odd.gif", tmp_path / "odd.mp4"]
    frames = iio.imread(tmp_path / "odd.mp4")
    assert (
        frames.shape[0] == 4
        and frames.shape[1] >= grid.shape[1]
        and frames.shape[2] >= grid.shape[2]
    )
