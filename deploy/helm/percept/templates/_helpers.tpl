{{- define "percept.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "percept.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "percept.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "percept.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "percept.secretName" -}}
{{- if .Values.secret.create -}}
{{ include "percept.fullname" . }}
{{- else -}}
{{ required "secret.existingSecret is required when secret.create is false" .Values.secret.existingSecret }}
{{- end -}}
{{- end -}}

{{- define "percept.cacheVolume" -}}
- name: cache
{{- if .Values.cache.claim }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.claim }}
{{- else }}
  emptyDir: {}
{{- end }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "models.claim is required" .Values.models.claim }}
    readOnly: true
- name: tmp
  emptyDir: {}
{{- end -}}
