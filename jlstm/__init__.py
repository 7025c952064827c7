"""jlstm: the command line, the top layer (model <- data_shards <- orchestration <-
tune_spaces <- jlstm). It only assembles the commands each layer registers."""
