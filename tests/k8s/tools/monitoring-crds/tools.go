//go:build tools

// The packages whose types become the CRDs; imported here so that go.mod keeps them.
package tools

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
