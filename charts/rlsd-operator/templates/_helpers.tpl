{{/* Names, labels and selectors shared by every template. */}}

{{- define "rlsd-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rlsd-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "rlsd-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rlsd-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rlsd
{{- end }}

{{- define "rlsd-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rlsd-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rlsd-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rlsd-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The namespaces the operator watches: none means all (cluster scope) or the release namespace. */}}
{{- define "rlsd-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- toJson .Values.watchNamespaces }}
{{- else if eq .Values.rbac.scope "namespace" }}
{{- toJson (list .Release.Namespace) }}
{{- else }}
{{- toJson (list) }}
{{- end }}
{{- end }}

{{/*
The operator's NetworkPolicy settings (RLSD_OPERATOR_NETWORK_POLICY): the values, and the operator's
own pods as a peer (they read learner rank 0's progress from its metrics port).
*/}}
{{- define "rlsd-operator.networkPolicy" -}}
{{- $namespace := dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace) }}
{{- $pods := dict "matchLabels" (include "rlsd-operator.selectorLabels" . | fromYaml) }}
{{- $operator := dict "namespaceSelector" $namespace "podSelector" $pods }}
{{- dict "enabled" .Values.networkPolicy.enabled "metricsFrom" .Values.networkPolicy.metricsFrom "operator" $operator | toJson }}
{{- end }}

{{- define "rlsd-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Labels of the prometheus-operator objects. */}}
{{- define "rlsd-operator.monitoringLabels" -}}
{{ include "rlsd-operator.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}
