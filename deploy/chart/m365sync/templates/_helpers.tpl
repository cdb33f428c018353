{{/* Names and labels shared by every template. */}}
{{- define "m365sync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "m365sync.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "m365sync.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "m365sync.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "m365sync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "m365sync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "m365sync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "m365sync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector labels of one role: call with (dict "root" $ "role" "worker"). */}}
{{- define "m365sync.roleSelectorLabels" -}}
{{ include "m365sync.selectorLabels" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "m365sync.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "m365sync.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "m365sync.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The shard count every process and the autoscaler agree on. */}}
{{- define "m365sync.shards" -}}
{{- .Values.config.M365SYNC_SHARDS | default "8" | int -}}
{{- end -}}

{{/* An anchored regular expression naming exactly the shard queues of a role. */}}
{{- define "m365sync.shardQueueRegex" -}}
{{- $shards := list -}}
{{- range $i := until (include "m365sync.shards" .root | int) -}}
{{- $shards = append $shards (toString $i) -}}
{{- end -}}
{{- printf "^m365sync\\.%s\\.(%s)$" .role (join "|" $shards) -}}
{{- end -}}
