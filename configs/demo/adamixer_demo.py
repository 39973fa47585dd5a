# The AdaMixer baseline setting on the CPU demo (same tiny backbone, decoder size, data and
# schedule as configs/demo/stageinteractor_demo.py): 3-D sampler, 2^z refinement, no reuse,
# no dynamic biases, CSLA off. For a side-by-side comparison with the StageInteractor demo
# (python tools/run_demo.py --model both). Measured with the same 2500-iteration schedule on one
# torch thread: AP 65.1 / AP50 83.4, 5.4 min of training on a loaded machine (StageInteractor
# demo in the same run: 71.9 / 88.0; 67.5 / 86.7 after the final decoder refactor, see README).
from .stageinteractor_demo import dataloader, lr_multiplier, model, optimizer, train

model.decoder.sampler = "3d"
model.decoder.refine_mode = "2z"
model.decoder.dynamic_bias = False
model.decoder.reuse = False
model.criterion.assigner.enabled = False
train.output_dir = "./output/demo/adamixer"
dataloader.evaluator.output_dir = train.output_dir
