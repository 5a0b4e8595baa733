"""The model summary callback: Lightning's table, without a FLOPs column of zeros."""

import lightning as L
import pytest
import torch
from rich.console import Console

from sdlight.callbacks.summary import ModelSummary


class Net(L.LightningModule):
    def __init__(self, example: bool):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        if example:
            self.example_input_array = torch.randn(3, 8)

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("example", [False, True])
def test_flops_column_only_when_flops_were_measured(monkeypatch, example):
    console = Console(record=True, width=200)
    monkeypatch.setattr("rich.get_console", lambda: console)
    from lightning.pytorch.utilities.model_summary import summarize

    measured = summarize(Net(example), max_depth=2)  # what the callback's on_fit_start passes on
    ModelSummary.summarize(measured._get_summary_data(), measured.total_parameters, measured.trainable_parameters,
                           measured.model_size, measured.total_training_modes, total_flops=measured.total_flops)
    text = console.export_text()
    assert "body.0" in text and "Linear" in text and "178" in text  # 8·16+16 + 16·2+2 parameters
    assert ("FLOPs" in text) == example  # measured only with an example input
