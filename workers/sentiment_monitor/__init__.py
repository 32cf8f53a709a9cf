"""Finance sentiment monitoring: score news from Kafka, window it per ticker, raise alerts."""
