import logging, os, sys, time
sys.path.insert(0, "/work/wt/wandb"); sys.path.insert(0, "/work/wt/wandb/tests")
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from conftest import compose_config
os.environ.pop("WANDB_MODE", None)
os.environ["WANDB_API_KEY"] = "x" * 40
os.environ["WANDB_BASE_URL"] = "http://127.0.0.1:45873"
import torch; torch.set_num_threads(1)
from diffrun.monitoring import wandb_logger as W
def timed(name, fn):
    def wrap(*a, **k):
        t = time.time()
        try:
            return fn(*a, **k)
        finally:
            print(f"--- {name}: {time.time() - t:.2f}s", flush=True)
    return staticmethod(wrap)
for n in ("_init", "_abandon_online_attempt", "_has_credentials", "_init_kwargs", "_define_metrics"):
    setattr(W.WandbLogger, n, timed(n, getattr(W.WandbLogger, n)))
orig = W.WandbLogger.create.__func__
W.WandbLogger.create = classmethod(lambda cls, *a: timed("create", lambda: orig(cls, *a)).__func__())
from diffrun.cli import train
t = time.time()
train(compose_config(["train.steps=3"]), __import__("pathlib").Path(sys.argv[1]))
print("total", time.time() - t)
