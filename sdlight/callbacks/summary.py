"""Lightning's rich model summary without its FLOPs column when no FLOPs were measured.

Lightning measures a layer's FLOPs only for modules with an ``example_input_array``; ours take batch dicts and
have none, so the column and the total would read 0 for every layer. The training FLOPs that matter are
reported by the stages' ``flops_per_batch`` through ``ThroughputMonitor`` instead.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count


class ModelSummary(RichModelSummary):
    """``RichModelSummary`` whose table leaves out FLOPs when they are all zero (see the module docstring)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        if total_flops:
            RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                       total_training_modes, total_flops, **summarize_kwargs)
            return
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name, justify="right" if name in ("Params", "Params per Device") else "left",
                             style="dim" if name == " " else None, no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(f"[bold]Trainable params[/]: {get_human_readable_count(int(trainable_parameters))}  "
                      f"[bold]Non-trainable[/]: {get_human_readable_count(int(frozen))}  "
                      f"[bold]Total[/]: {get_human_readable_count(int(total_parameters))}  "
                      f"[bold]Size (MB)[/]: {get_formatted_model_size(model_size)}  "
                      f"[bold]Modules in train / eval mode[/]: {total_training_modes['train']} / "
                      f"{total_training_modes['eval']}")
