"""Detection losses (`detection`) and knowledge-distillation losses (`distill`) as element-wise functions."""
