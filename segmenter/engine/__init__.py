"""The engine room: what runs a model. The run folder and its record, training, evaluation, prediction, sliding-window
inference, metrics and the settings of each."""
