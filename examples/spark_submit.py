"""Run any retrainer command under spark-submit, which supplies the master and settings.

    spark-submit --master spark://head:7077 --conf spark.executor.memory=4g \
        examples/spark_submit.py bottlenecks --image-dir /shared/photos --engine spark \
        --bottleneck-dir /shared/cache --backbone efficientnet_lite0
"""
from retrainer.cli import main

if __name__ == "__main__":
    main()
