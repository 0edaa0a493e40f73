"""The OpenAI Batch API on a durable store (docs/BATCHES.md): files and batches over HTTP
(`routes`), the rows that survive any replica (`store`), the input and output line formats
(`lines`), the worker in each router replica that runs lines on spare capacity (`worker`), and the
`gateway.batch` section that configures them (`config`)."""
