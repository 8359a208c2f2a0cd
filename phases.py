import os, time, sys
t0 = time.time()
import wandb
t1 = time.time(); print("import", t1 - t0, flush=True)
print("login", wandb.login(prompt=False, verify=False), time.time() - t1, flush=True)
t2 = time.time()
try:
    wandb.init(mode="online", id="abc-1234", resume="allow", dir=sys.argv[1], project="p", settings=wandb.Settings(init_timeout=10.0))
except Exception as e:
    print("init failed", type(e).__name__, time.time() - t2, flush=True)
t3 = time.time(); wandb.teardown(); print("teardown", time.time() - t3, flush=True)
