{{/*
Name and label helpers shared by every template (the prometheus-community layout: name, fullname,
chart, labels, selectorLabels, one serviceAccountName per component, image).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "wattsched.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else the release name when it already contains
the chart name, else "<release>-<chart>". Truncated to 63 characters (the DNS label limit);
wattsched.componentName shortens it further to fit its suffix.
*/}}
{{- define "wattsched.fullname" -}}
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

{{/* "<fullname>-<component>", DNS-safe. Call with (dict "root" $ "component" "operator"). */}}
{{- define "wattsched.componentName" -}}
{{- printf "%s-%s" (include "wattsched.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{/* The helm.sh/chart label value. */}}
{{- define "wattsched.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. Call with (dict "root" $ "component" "operator"). */}}
{{- define "wattsched.labels" -}}
helm.sh/chart: {{ include "wattsched.chart" .root }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: {{ include "wattsched.name" .root }}
{{ include "wattsched.selectorLabels" . }}
{{- with .root.Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select one component's pods (immutable in Deployment/DaemonSet selectors). */}}
{{- define "wattsched.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wattsched.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "wattsched.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "wattsched.componentName" (dict "root" . "component" "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The agent's ServiceAccount name. */}}
{{- define "wattsched.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "wattsched.componentName" (dict "root" . "component" "agent")) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: registry/repository:tag, or @digest when a digest is set. */}}
{{- define "wattsched.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s/%s:%s@%s" .Values.image.registry .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s/%s:%s" .Values.image.registry .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
An HTTP probe: (dict "probe" <values probe> "path" <path> "port" <port name>). Renders nothing for
an empty probe, so `livenessProbe: {}` disables it.
*/}}
{{- define "wattsched.httpProbe" -}}
{{- if .probe }}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{ toYaml .probe }}
{{- end }}
{{- end }}

{{/* The ServiceMonitor for one component: (dict "root" $ "component" "agent" "values" .Values.agent). */}}
{{- define "wattsched.serviceMonitor" -}}
{{- $values := .values }}
{{- if and $values.service.enabled $values.serviceMonitor.enabled }}
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "wattsched.componentName" . }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "wattsched.labels" . | nindent 4 }}
    {{- with $values.serviceMonitor.additionalLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  jobLabel: app.kubernetes.io/component
  namespaceSelector:
    matchNames:
      - {{ .root.Release.Namespace }}
  selector:
    matchLabels:
      {{- include "wattsched.selectorLabels" . | nindent 6 }}
  endpoints:
    - port: metrics
      path: /metrics
      interval: {{ $values.serviceMonitor.interval }}
      scrapeTimeout: {{ $values.serviceMonitor.scrapeTimeout }}
      {{- if eq .component "agent" }}
      # The agent's series carry the workload pod's `pod` and `namespace` (DCGM exporter labels):
      # keep them, rather than Prometheus renaming them `exported_*` under the agent pod's own.
      honorLabels: true
      # Keep the node name as a target label so series say which node's agent reported them.
      relabelings:
        - sourceLabels: [__meta_kubernetes_pod_node_name]
          targetLabel: node
      {{- end }}
{{- end }}
{{- end }}
