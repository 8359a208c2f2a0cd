"""Sample grids during and at the end of training (a callback): `<run>/samples/step_<step>.png`."""
from __future__ import annotations

from diffrun.sampling.images import save_grid
from diffrun.training.callbacks import Callback


class SampleGrids(Callback):
    """`sample.num_images` EMA samples with the fixed `sample.seed` every `sample.every_steps` steps and at the
    end, so that grids of different runs and steps show the same noise."""

    def every_steps(self, trainer) -> int:
        return trainer.cfg.sample.every_steps

    def grid(self, trainer):
        settings = trainer.cfg.sample
        if settings.num_images <= 0:
            return None
        images, _ = trainer.generate(settings.num_images, settings.seed, "sample")
        path = save_grid(images, trainer.run_dir / "samples" / f"step_{trainer.step:08d}.png")
        trainer.events.emit_sample(trainer, images, path)
        return path

    def on_step(self, trainer) -> None:
        self.grid(trainer)

    def on_end(self, trainer) -> dict:
        path = self.grid(trainer)
        return {"samples": str(path)} if path else {}
