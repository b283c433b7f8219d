"""Run ``train_erase.py`` and kill it with SIGKILL at a chosen point (fault injection, tests/test_reliability.py).

    python tests/scripts/killed_run.py POINT STEP <train_erase.py flags>

POINT (at training step / checkpoint STEP):
  checkpoint-write   accelerate has written the model file of checkpoint STEP, not yet the optimizer state
  checkpoint-rename  checkpoint STEP is complete in its temporary folder, not yet renamed to checkpoint-STEP
  prune              checkpoint STEP is in place, the old ones (checkpoints_total_limit) not yet removed
  step               in the middle of training step STEP (between checkpoints)
  outputs            the erasure file is written, the merged unet/ only into its temporary folder
  never              no kill (a normal run through this wrapper)

The process really dies by SIGKILL (no Python cleanup, no ``finally``), as with ``kill -9``.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import accelerate.checkpointing

    import salun_diffusers.erasure.checkpoints as ckpt
    import salun_diffusers.erasure.outputs as outputs
    import salun_diffusers.erasure.training as training
    import train_erase

    current = {"step": None, "saves": 0, "losses": 0}
    save_checkpoint, acc_save = training.save_checkpoint, accelerate.checkpointing.save

    def tracked_save_checkpoint(accelerator, config, at):
        current["step"] = at
        save_checkpoint(accelerator, config, at)

    def killing_save(*args, **kwargs):
        acc_save(*args, **kwargs)
        if point == "checkpoint-write" and current["step"] == step:
            die()  # after the first file (the model) of checkpoint STEP

    training.save_checkpoint = tracked_save_checkpoint
    accelerate.checkpointing.save = killing_save

    if point == "checkpoint-rename":
        follow_umask = ckpt.follow_umask

        def killing_follow_umask(path):
            follow_umask(path)
            if current["step"] == step:
                die()
        ckpt.follow_umask = killing_follow_umask
    if point == "prune":
        prune = ckpt.prune_checkpoints

        def killing_prune(output_dir, keep):
            if current["step"] == step:
                die()
            prune(output_dir, keep)
        ckpt.prune_checkpoints = killing_prune
    if point == "step":
        loss = training.salun_loss

        def killing_loss(*args, **kwargs):
            current["losses"] += 1
            out = loss(*args, **kwargs)
            if current["losses"] == step:  # resumed runs count from their first step: pass STEP relative to it
                die()
            return out
        training.salun_loss = killing_loss
    if point == "outputs":
        def killing_install_dir(tmp, dest):
            die()  # the merged unet/ is complete in its temporary folder, not yet renamed into place
        outputs._install_dir = killing_install_dir
    sys.exit(train_erase.main(argv))


if __name__ == "__main__":
    main()
