"""Everything that runs retrainer on Apache Spark (``pip install 'retrainer[spark]'``).

- :mod:`.session`: getting the running SparkSession or starting a quiet one, with one-line
  errors for what usually goes wrong (no pyspark, no Java, an unreachable master).
- :mod:`.workers`: what runs on the executors: the model shipped once per job and loaded once
  per Python worker, and the decode-and-run UDF over image bytes.
- :mod:`.label`: labelling many images into one Parquet table.

The bottleneck engine built on these (:class:`retrainer.bottlenecks.engines.spark.SparkEngine`)
belongs with the other engines. Importing this package imports neither pyspark nor TensorFlow.
"""
