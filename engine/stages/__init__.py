"""The stage recipes, one module each, readable top to bottom (like torchtune recipes).

Each module has `run(ctx: StageContext) -> None` and runs only inside its worker process. No stage
imports another: what two stages share lives in engine.train, engine.teacher or engine.models.
The names and their order are in engine.pipeline.stages.
"""
