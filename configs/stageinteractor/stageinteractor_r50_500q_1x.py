# StageInteractor R50, 500 queries, 1x. Paper Tab. 2 "StageInteractor†": 46.9 AP.
# No released config (spec §7.15): the 100-query 1x recipe with 500 queries (and top-500
# detections per image, the default max_detections_per_image = num_queries).
from .stageinteractor_r50_100q_1x import dataloader, lr_multiplier, model, optimizer, train

model.decoder.num_queries = 500
train.output_dir = "./output/stageinteractor_r50_500q_1x"
dataloader.evaluator.output_dir = train.output_dir
