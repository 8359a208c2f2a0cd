"""Sample grids during and at the end of training (a callback): `<run>/samples/step_<step>.png`."""
from __future__ import annotations

from diffrun.sampling.images import save_grid
from diffrun.training.callbacks import Callback
from diffrun.training.run_view import RunView


class SampleGrids(Callback):
    """`num_images` EMA samples with the fixed `seed` every `every_steps` steps and at the end, so that grids of
    different runs and steps show the same noise. `settings`: the `sample` node (conf/callbacks/default.yaml)."""

    def __init__(self, settings):
        self.settings = settings

    def every_steps(self) -> int:
        return self.settings.every_steps

    def grid(self, run: RunView):
        if self.settings.num_images <= 0:
            return None
        images, _ = run.generate(self.settings.num_images, self.settings.seed, self.settings, "sample")
        path = save_grid(images, run.run_dir / "samples" / f"step_{run.step:08d}.png")
        run.events.emit_sample(images, path)
        return path

    def on_step(self, run: RunView) -> None:
        self.grid(run)

    def on_end(self, run: RunView) -> dict:
        path = self.grid(run)
        return {"samples": str(path)} if path else {}
