{{/*
Names. The StatefulSet's name is the fullname; it is at most 52 characters
because Kubernetes adds "-<10-character hash>" to it in the
controller-revision-hash label (63 at most).
*/}}
{{- define "gantry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "gantry.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gantry.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The headless Service: peer DNS names <pod>.<this>.<ns>.svc.<domain>. */}}
{{- define "gantry.headlessName" -}}
{{- printf "%s-headless" (include "gantry.fullname" .) }}
{{- end }}

{{/* The client Service (ready brokers only). */}}
{{- define "gantry.clientName" -}}
{{- include "gantry.fullname" . }}
{{- end }}

{{/* host:port of the client Service, fully qualified. */}}
{{- define "gantry.clientAddress" -}}
{{- printf "%s.%s.svc.%s:%d" (include "gantry.clientName" .) .Release.Namespace .Values.cluster.clusterDomain (int .Values.service.clientPort) }}
{{- end }}

{{- define "gantry.labels" -}}
helm.sh/chart: {{ include "gantry.chart" . }}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/version: {{ (default .Chart.AppVersion .Values.image.tag) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gantry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gantry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Selects broker pods only (not the example worker's). */}}
{{- define "gantry.brokerSelectorLabels" -}}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "gantry.workerSelectorLabels" -}}
{{ include "gantry.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "gantry.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gantry.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gantry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "gantry.workerImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.worker.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tag) }}
{{- end }}

{{- define "gantry.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "gantry.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "gantry.workerTlsSecretName" -}}
{{- default (printf "%s-worker-tls" (include "gantry.fullname" .)) .Values.worker.tls.existingSecret }}
{{- end }}

{{/*
Whether the example worker presents a client certificate: the brokers ask
for one (tls.clientAuth), so it must.
*/}}
{{- define "gantry.workerClientCert" -}}
{{- if and .Values.worker.enabled .Values.tls.enabled .Values.tls.clientAuth }}true{{ end }}
{{- end }}

{{- define "gantry.authSecretName" -}}
{{- default (printf "%s-auth" (include "gantry.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/*
A probe: gRPC health (grpc.health.v1) on the client port, or, with TLS on
(kubelet's gRPC probes speak plaintext only), HTTP on the metrics port.
Called with (dict "probe" <probes.x> "path" "/healthz" "root" $).
*/}}
{{- define "gantry.probe" -}}
{{- $root := .root }}
{{- if $root.Values.tls.enabled }}
httpGet:
  path: {{ .path }}
  port: metrics
{{- else }}
grpc:
  port: {{ $root.Values.service.clientPort }}
  {{- with .probe.service }}
  service: {{ . | quote }}
  {{- end }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
{{- end }}

{{/*
The arguments the start-up script passes on to `gantry serve`: settings
from .Values.config, then TLS and token files, then extraArgs.
*/}}
{{- define "gantry.serveArgs" -}}
{{- range $flag, $value := .Values.config }}
{{- if kindIs "bool" $value }}
{{- if $value }}
- {{ printf "--%s" $flag | quote }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
- {{ printf "--%s" $flag | quote }}
- {{ include "gantry.scalar" $value | quote }}
{{- end }}
{{- end }}
{{- if .Values.tls.enabled }}
- "--tls-cert"
- "/etc/gantry/tls/tls.crt"
- "--tls-key"
- "/etc/gantry/tls/tls.key"
{{- if .Values.tls.clientAuth }}
- "--tls-client-ca"
- "/etc/gantry/tls/ca.crt"
{{- end }}
- "--peer-tls-cert"
- "/etc/gantry/tls/tls.crt"
- "--peer-tls-key"
- "/etc/gantry/tls/tls.key"
- "--peer-tls-ca"
- "/etc/gantry/tls/ca.crt"
{{- end }}
{{- if .Values.auth.enabled }}
- "--token-file"
- {{ printf "/etc/gantry/auth/%s" .Values.auth.tokensKey | quote }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ include "gantry.scalar" . | quote }}
{{- end }}
{{- end }}

{{/* A value as text; whole numbers without an exponent (YAML numbers reach
templates as float64, and 1000000 would print as 1e+06). */}}
{{- define "gantry.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- . | int64 }}
{{- else }}
{{- . | toString }}
{{- end }}
{{- end }}
