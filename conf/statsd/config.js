{
  "graphiteHost": "127.0.0.1",
  "graphitePort": 2003,
  "port": 8125,
  "flushInterval": 10000,
  "backends": ["./backends/graphite"],
  "graphite": {"legacyNamespace": false},
  "percentThreshold": [50, 99],
  "deleteGauges": true
}
